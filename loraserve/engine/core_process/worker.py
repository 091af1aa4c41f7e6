"""The engine process: loads the model, steps the LLMEngine on its main thread, and answers over the pipe.

Messages from the API process land in an inbox (filled by a receiving thread) that the main thread drains
before each step, as AsyncEngine's step thread does: only the main thread touches the engine (and torch).
Each step's outputs go back as one message. Importing this module loads no torch: the engine is imported
by `run_worker`, in the child.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from loraserve.engine.config import EngineConfig
from loraserve.engine.core_process.channel import Channel, ChannelClosed
from loraserve.engine.core_process.messages import (
    AbortRequest,
    AddRequest,
    ForgetAdapter,
    FromEngine,
    LoadFailed,
    Ready,
    Shutdown,
    Snapshot,
    Started,
    StepOut,
    ToEngine,
    TokenOut,
    ended,
)
from loraserve.engine.sources import tokenizer_file
from loraserve.types import FinishReason, ModelInfo

if TYPE_CHECKING:
    from loraserve.engine.llm_engine import LLMEngine, StepOutput

# With nothing to do, the loop still wakes this often to publish gauges that changed meanwhile (an
# adapter the loader thread finished reading into host memory).
IDLE_PUBLISH_S = 0.5
EngineChannel = Channel[FromEngine, ToEngine]


def run_worker(conn: Connection, source: str, config: EngineConfig, nice: int) -> None:
    """The engine process's entry point (a multiprocessing target, started with spawn), `nice` steps below
    the API process: set before torch starts its threads, which inherit it."""
    # Ctrl-C in a terminal reaches the whole process group: the API process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    channel: EngineChannel = Channel(conn)
    try:
        from loraserve.engine.async_engine import model_info
        from loraserve.engine.loader import load_engine

        channel.send(Started(tokenizer_file(source)))
        # The API process admits requests against config.max_queue, counting its own sends (client.py);
        # preemption may still put up to a batch back in the waiting queue in between, and a request the
        # client admitted must never be refused here, where it would surface as an error instead of 3040.
        engine, _ = load_engine(source, replace(config, max_queue=config.max_queue + config.max_num_seqs))
    except ChannelClosed:
        return
    except BaseException as exc:  # the API process raises it in its place (a bad source: OSError/ValueError)
        with contextlib.suppress(ChannelClosed):
            channel.send(LoadFailed(_portable(exc)))
        return
    EngineLoop(engine, channel).run(model_info(engine))


def _portable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class EngineLoop:
    def __init__(self, engine: LLMEngine, channel: EngineChannel) -> None:
        self.engine = engine
        self._channel = channel
        self._inbox: list[ToEngine] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._adapter_loaded = False  # set by the adapter loader's thread, read under the lock
        self._live: set[str] = set()  # requests taken and not finished: what an abort or a failure reaches
        self._adds_taken = 0
        self._published: Snapshot | None = None
        engine.adapters.on_loaded = self._on_adapter_loaded
        threading.Thread(target=self._receive, name="engine-inbox", daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                message = self._channel.recv()
            except ChannelClosed:  # the API process is gone: nobody is left to serve
                message = Shutdown()
            with self._lock:
                if isinstance(message, Shutdown):
                    self._stopped = True
                else:
                    self._inbox.append(message)
                self._wake.notify()
            if isinstance(message, Shutdown):
                return

    def _on_adapter_loaded(self) -> None:
        with self._lock:
            self._adapter_loaded = True
            self._wake.notify()

    def run(self, info: ModelInfo) -> None:
        engine = self.engine
        try:
            self._published = Snapshot(engine.stats(), self._adds_taken)
            self._channel.send(Ready(info, self._published))
            while True:
                with self._lock:
                    if not self._stopped and not self._inbox and not engine.has_work():
                        self._wake.wait(timeout=IDLE_PUBLISH_S)
                    # Work is waiting only for adapters being loaded: sleep until one is (or a request
                    # comes or goes) instead of spinning; the timeout is a safety net, not the mechanism.
                    if engine.stalled and not (self._stopped or self._inbox or self._adapter_loaded):
                        self._wake.wait(timeout=0.05)
                    self._adapter_loaded = False
                    if self._stopped:
                        break
                    inbox, self._inbox = self._inbox, []
                outputs: list[TokenOut] = []
                for item in inbox:
                    self._apply(item, outputs)
                if engine.has_work():
                    try:
                        outputs += [self._token_out(out) for out in engine.step()]
                    except Exception as exc:  # never leave clients hanging: fail everything in flight
                        outputs += self._fail_all(f"engine step failed: {exc!r}")
                self._publish(outputs)
            self._publish(self._fail_all("engine is shut down"))
        except ChannelClosed:  # the API process is gone
            pass
        finally:
            engine.adapters.close()

    def _apply(self, item: ToEngine, outputs: list[TokenOut]) -> None:
        if isinstance(item, AddRequest):
            self._adds_taken += 1
            try:
                self.engine.add_request(item.request_id, item.prompt, item.params, item.adapter,
                                        item.cache_salt)
            except Exception as exc:
                outputs.append(ended(item.request_id, FinishReason.ERROR, str(exc) or repr(exc)))
            else:
                self._live.add(item.request_id)
        elif isinstance(item, AbortRequest):
            if item.request_id in self._live:
                self.engine.abort(item.request_id)
                self._live.discard(item.request_id)
                outputs.append(ended(item.request_id, FinishReason.ABORT))
        elif isinstance(item, ForgetAdapter):
            self.engine.adapters.forget(item.key)

    def _token_out(self, out: StepOutput) -> TokenOut:
        seq = out.seq
        finish = seq.finish_reason if out.finished else None
        error = self.engine.adapters.failure(seq.adapter_key or "") if finish is FinishReason.ERROR else None
        if finish is not None:
            self._live.discard(seq.request_id)
        return (seq.request_id, out.token, finish, seq.num_output, error, out.logprobs, out.prompt_scores,
                seq.num_cached_prompt)

    def _fail_all(self, message: str) -> list[TokenOut]:
        failed = [ended(request_id, FinishReason.LOST, message) for request_id in self._live]
        for request_id in self._live:
            self.engine.abort(request_id)
        self._live.clear()
        return failed

    def _publish(self, outputs: list[TokenOut]) -> None:
        """One message for the step: every request's output, and the gauges when they changed (taken
        before the outputs are read, so a finished request shows as freed)."""
        snapshot = Snapshot(self.engine.stats(), self._adds_taken)
        changed = snapshot != self._published
        if outputs or changed:
            self._channel.send(StepOut(outputs, snapshot if changed else None))
            self._published = snapshot

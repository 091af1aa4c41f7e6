"""The server's `Backend` over an engine in its own process: what the API process keeps.

Templating, tokenization and detokenization happen here, with the tokenizer the engine process names
(read while it loads the weights). Admission is decided here too, with no round trip: the engine reports
its gauges after every step (`Snapshot`), and AddRequests sent since are counted as queued, as
AsyncEngine counts its inbox. The supervisor's reader thread turns each step's message into StreamEvents
and hands them to each stream's event loop, one callback per loop per step.

While the engine process is down (it died and is being restarted), every open stream has ended with an
error event and new requests are refused as QueueFull (the API's 3040, "Capacity temporarily exceeded,
please try again"): the same answer a full queue gets, at once, until the new process has loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from loraserve.chat_template import ChatTemplate
from loraserve.engine.admission import LockedAdmission
from loraserve.engine.config import EngineConfig
from loraserve.engine.core_process.channel import ChannelClosed
from loraserve.engine.core_process.messages import (
    AbortRequest,
    AddRequest,
    ForgetAdapter,
    Ready,
    Snapshot,
    StepOut,
    TokenOut,
)
from loraserve.engine.core_process.supervisor import ENGINE_NICE, RestartPolicy, Supervisor
from loraserve.engine.streams import NO_LOGPROBS, RequestEvents, Stream, event_logprobs
from loraserve.engine.text_face import TextFace
from loraserve.engine.weights.detokenizer import IncrementalDetokenizer
from loraserve.engine.weights.token_bytes import TokenBytes
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.types import (
    AdapterRef,
    FinishReason,
    QueueFull,
    SamplingParams,
    StreamEvent,
)


@dataclass
class _Stream(Stream):
    prompt_head: list[int] = field(default_factory=list)  # the prompt's first token, for prompt_logprobs


# (request id, its stream, its next event), gathered per event loop for one callback.
_Delivery = tuple[str, _Stream, StreamEvent]


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer in a .gguf file or a Hugging Face directory (what `Started` names). No torch."""
    if path.endswith(".gguf"):
        from loraserve.engine.weights.gguf_meta import GGUFFile

        return Tokenizer.from_gguf(GGUFFile(path))
    return Tokenizer.from_hf_dir(path)


class EngineClient(TextFace, LockedAdmission):
    """Starts the engine process for `source` and waits until its model is loaded; raises what loading
    raised (a bad source: OSError or ValueError), as `load_backend` does.

    The process is started with multiprocessing's spawn, which imports the main module again in the
    child: a script that builds a client must do so under `if __name__ == "__main__":`."""

    def __init__(self, source: str, config: EngineConfig | None = None,
                 chat_template: ChatTemplate | None = None, restart: RestartPolicy | None = None,
                 nice: int = ENGINE_NICE) -> None:
        self._config = config or EngineConfig()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._up = False
        self._stopped = False
        self._adds_sent = 0  # AddRequests sent to the current engine process
        self._snapshot = Snapshot({}, 0)
        self._tokenizer_load: Future[Tokenizer] | None = None
        self._supervisor = Supervisor(source, self._config, self, restart, nice)
        self._info = self._supervisor.start().info
        try:
            assert self._tokenizer_load is not None  # engine_started came before Ready
            self.tokenizer = self._tokenizer_load.result()
        except BaseException:
            self._supervisor.stop()
            raise
        self.chat_template = chat_template or self.tokenizer.chat_template
        self._token_bytes: TokenBytes = TokenBytes(self.tokenizer)

    # -- Backend -----------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The engine process's id (the one loading, during a restart); None after shutdown."""
        return self._supervisor.pid

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: AdapterRef | None = None, cache_salt: str | None = None,
                 session_id: str | None = None) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
                         len(prompt_token_ids), prompt_head=prompt_token_ids[:1])
        with self._lock:  # sends under the lock: a request's add always precedes its abort
            if self._stopped:
                raise RuntimeError("engine is shut down")
            self._admit(len(prompt_token_ids), params.max_tokens)
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id}")
            try:
                self._supervisor.send(AddRequest(request_id, list(prompt_token_ids), params, adapter,
                                                 cache_salt, session_id))
            except ChannelClosed:  # it died this instant; its reader is about to report it
                raise QueueFull() from None
            self._streams[request_id] = stream
            self._adds_sent += 1
        return RequestEvents(self.abort, request_id, stream)

    def _full(self) -> bool:
        if not self._up:
            return True
        queued = self._snapshot.stats.get("queue_depth", 0.0) + self._adds_sent - self._snapshot.adds_taken
        return queued >= self._config.max_queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._streams and self._up:
                self._send(AbortRequest(request_id))

    def forget_adapter(self, key: str) -> None:
        with self._lock:
            if self._up:  # otherwise the next engine process starts with empty caches
                self._send(ForgetAdapter(key))

    def stats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._snapshot.stats)

    def shutdown(self) -> None:
        """Stops the engine process: open streams end with an error event."""
        with self._lock:
            self._stopped = True
        self._supervisor.stop()
        with self._lock:
            self._up = False
        self._fail_all("engine is shut down")

    def _send(self, message: AbortRequest | ForgetAdapter) -> None:
        with contextlib.suppress(ChannelClosed):  # the engine died: engine_lost ends its requests
            self._supervisor.send(message)

    # -- EngineListener: called by the supervisor's thread ---------------------------------------
    def engine_started(self, tokenizer_file: str) -> None:
        # Read on a thread of its own while the engine process loads the weights (a GGUF vocabulary
        # takes seconds), so that a load failure is raised as soon as it is reported.
        if self._tokenizer_load is None:  # a restarted engine serves the same model
            self._tokenizer_load = _in_background(load_tokenizer, tokenizer_file)

    def engine_ready(self, ready: Ready) -> None:
        with self._lock:
            self._snapshot = ready.snapshot
            self._adds_sent = 0
            self._up = not self._stopped

    def engine_message(self, message: StepOut) -> None:
        with self._lock:
            if message.snapshot is not None:
                self._snapshot = message.snapshot
            taken: list[tuple[TokenOut, _Stream]] = []
            for out in message.outputs:
                request_id, finished = out[0], out[2] is not None
                stream = self._streams.pop(request_id, None) if finished else self._streams.get(request_id)
                if stream is not None:
                    taken.append((out, stream))
        # Detokenized outside the lock: only this thread ever pushes tokens into a stream.
        deliveries: list[_Delivery] = []
        for (request_id, token, finish, num_output, error, scores, prompt_scores, cached), stream in taken:
            logprobs = (NO_LOGPROBS if scores is None and prompt_scores is None else
                        event_logprobs(self._token_bytes, scores, prompt_scores, stream.prompt_head))
            event = stream.event(token, finish, num_output, error, logprobs, cached)
            deliveries.append((request_id, stream, event))
        self._deliver(deliveries)

    def engine_lost(self, reason: str) -> None:
        with self._lock:
            self._up = False
        self._fail_all(f"{reason}; a new one is being started")

    # -- delivery ----------------------------------------------------------------------------------
    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        self._deliver([(request_id, stream, stream.event(None, FinishReason.LOST, 0, message))
                       for request_id, stream in streams.items()])

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for delivery in deliveries:
            by_loop.setdefault(delivery[1].loop, []).append(delivery)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # its event loop is closed: nobody can read these streams any more
                for request_id, stream, event in batch:
                    if event.finish_reason is None:
                        self._orphaned(request_id, stream)

    def _orphaned(self, request_id: str, stream: _Stream) -> None:
        stream.done = True
        with self._lock:
            if self._streams.pop(request_id, None) is not None and self._up:
                self._send(AbortRequest(request_id))


def _in_background(work: Callable[[str], Tokenizer], arg: str) -> Future[Tokenizer]:
    future: Future[Tokenizer] = Future()

    def run() -> None:
        try:
            future.set_result(work(arg))
        except BaseException as exc:  # raised by the constructor, on its thread
            future.set_exception(exc)

    threading.Thread(target=run, name="tokenizer-load", daemon=True).start()
    return future


def _put_all(batch: list[_Delivery]) -> None:
    for _, stream, event in batch:
        stream.queue.put_nowait(event)

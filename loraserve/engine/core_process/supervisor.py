"""Starts the engine process, reads everything it sends, and starts a new one when it dies.

One thread per supervisor reads the pipe and hands each message to the listener (the client). When the
pipe ends without a shutdown having been asked for, the process died (kill -9, the OOM killer, a crash in
native code): the listener hears it at once, so that every open stream ends and new requests are refused,
and a new process is started after a delay that doubles while processes keep dying soon after starting.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Protocol

from loraserve.engine.config import EngineConfig
from loraserve.engine.core_process.channel import Channel, ChannelClosed, pipe
from loraserve.engine.core_process.messages import (
    FromEngine,
    LoadFailed,
    Ready,
    Shutdown,
    Started,
    StepOut,
    ToEngine,
)
from loraserve.engine.core_process.worker import run_worker

logger = logging.getLogger("loraserve.engine")
ClientChannel = Channel[ToEngine, FromEngine]
SHUTDOWN_WAIT_S = 10.0
# The engine process's niceness: below the API process, so that answering HTTP (health, refusals, the
# next token of a stream) never waits for a step to give a core back; with nothing else wanting the
# cores it changes nothing (RELIABILITY.md section 4, "The split as the default").
ENGINE_NICE = 5


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.25
    max_delay_s: float = 30.0
    # A process that served at least this long before dying is restarted after first_delay_s again.
    stable_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError("RestartPolicy needs 0 <= first_delay_s <= max_delay_s")
        if self.stable_s < 0:
            raise ValueError("RestartPolicy.stable_s must be >= 0")


class EngineListener(Protocol):
    def engine_started(self, tokenizer_file: str) -> None:
        """The engine process runs and is loading the model (called before each `engine_ready`)."""

    def engine_ready(self, ready: Ready) -> None:
        """A restarted engine process has loaded the model and takes requests."""

    def engine_message(self, message: StepOut) -> None: ...

    def engine_lost(self, reason: str) -> None:
        """The engine process died; a new one is being started."""


class EngineLoadError(OSError):
    """The engine process died before its model was loaded (killed, out of memory): an OSError, as a
    model file that cannot be read, for `serve` to report."""


class _Worker:
    """One engine process and the API process's end of its pipe."""

    def __init__(self, source: str, config: EngineConfig, nice: int) -> None:
        ours, theirs = pipe()
        self.channel: ClientChannel = Channel(ours)
        self.process: BaseProcess = multiprocessing.get_context("spawn").Process(
            target=run_worker, args=(theirs, source, config, nice), name="loraserve-engine", daemon=True)
        self.process.start()
        theirs.close()  # the child's copy is the only one left: its death ends the pipe here
        self.ready_at = 0.0

    def handshake(self, started: Callable[[str], None]) -> Ready:
        """Waits for the model to load; raises what loading raised."""
        try:
            message = self.channel.recv()
            if isinstance(message, Started):
                started(message.tokenizer_file)
                message = self.channel.recv()
        except ChannelClosed:
            raise EngineLoadError(f"the engine process {self.exit_reason()} while loading") from None
        if isinstance(message, LoadFailed):
            raise message.error
        if not isinstance(message, Ready):
            raise EngineLoadError(f"the engine process sent {type(message).__name__} before Ready")
        self.ready_at = time.monotonic()
        return message

    def exit_reason(self) -> str:
        self.process.join(timeout=2)  # its pipe closed as it died: it is about to be reapable
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"

    def stop(self, wait_s: float) -> None:
        """Asks for a clean stop (in-flight requests end with an error event); kills it after `wait_s`."""
        with contextlib.suppress(ChannelClosed):
            self.channel.send(Shutdown())
        self.process.join(timeout=wait_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class Supervisor:
    def __init__(self, source: str, config: EngineConfig, listener: EngineListener,
                 policy: RestartPolicy | None = None, nice: int = ENGINE_NICE) -> None:
        if not 0 <= nice <= 19:
            raise ValueError(f"the engine process's nice must be 0..19 (above this process's), not {nice}")
        self._source, self._config, self._listener, self._nice = source, config, listener, nice
        self._policy = policy or RestartPolicy()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._worker: _Worker | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The engine process's id (None between processes)."""
        worker = self._worker
        return worker.process.pid if worker is not None else None

    def start(self) -> Ready:
        """Starts the first engine process and waits until its model is loaded (the listener hears
        `engine_started`, then `engine_ready`); raises what loading raised (a bad source: OSError,
        ValueError), with no process left behind."""
        ready = self._handshake(self._spawn())
        self._listener.engine_ready(ready)  # before the reader runs: no message can overtake it
        self._thread = threading.Thread(target=self._supervise, name="engine-reader", daemon=True)
        self._thread.start()
        # Before multiprocessing's own exit handler kills the process: a clean stop, and no restart.
        atexit.register(self.stop)
        return ready

    def send(self, message: ToEngine) -> None:
        """Raises ChannelClosed when the process is gone (the reader is about to report it)."""
        worker = self._worker
        if worker is None:
            raise ChannelClosed("no engine process")
        worker.channel.send(message)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        with self._lock:  # no process is spawned after this
            self._stopping.set()
            worker = self._worker
        if worker is not None:
            worker.stop(SHUTDOWN_WAIT_S)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=SHUTDOWN_WAIT_S)
        with self._lock:
            self._worker = None

    def _spawn(self) -> _Worker:
        with self._lock:
            if self._stopping.is_set():
                raise EngineLoadError("the engine is shut down")
            self._worker = _Worker(self._source, self._config, self._nice)
            return self._worker

    def _handshake(self, worker: _Worker) -> Ready:
        try:
            return worker.handshake(self._listener.engine_started)
        except BaseException:
            worker.stop(0)
            with self._lock:
                self._worker = None
            raise

    def _supervise(self) -> None:
        worker = self._worker
        delay = self._policy.first_delay_s
        while worker is not None:
            self._pump(worker)
            if self._stopping.is_set():
                return
            reason = f"the engine process {worker.exit_reason()}"
            worker.stop(0)  # if it only closed its pipe: never two engines at once
            with self._lock:
                self._worker = None
            self._listener.engine_lost(reason)
            if time.monotonic() - worker.ready_at >= self._policy.stable_s:
                delay = self._policy.first_delay_s
            logger.error("%s; starting a new one in %.2f s", reason, delay)
            worker, delay = self._restart(delay)

    def _pump(self, worker: _Worker) -> None:
        """Hands every message to the listener until the pipe ends."""
        while True:
            try:
                message = worker.channel.recv()
            except ChannelClosed:
                return
            if isinstance(message, StepOut):
                self._listener.engine_message(message)

    def _restart(self, delay: float) -> tuple[_Worker | None, float]:
        """A new process, ready, and the delay before the next restart; None once stopping."""
        while not self._stopping.wait(delay):
            delay = min(max(delay * 2, self._policy.first_delay_s), self._policy.max_delay_s)
            try:
                worker = self._spawn()
                ready = self._handshake(worker)
            except BaseException as exc:
                if self._stopping.is_set():
                    return None, delay
                logger.error("the engine process failed to load (%s); retrying in %.2f s", exc, delay)
                continue
            logger.warning("the engine process is back (pid %s)", worker.process.pid)
            self._listener.engine_ready(ready)
            return worker, delay
        return None, delay

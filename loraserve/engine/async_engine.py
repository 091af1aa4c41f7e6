"""The async face of the engine (the server's `Backend`): the step loop runs in its own thread.

Requests and aborts from the event loop land in an inbox that the step thread drains before each
step, so only that thread ever touches the scheduler. Text deltas go back through
`loop.call_soon_threadsafe` into a per-request asyncio queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from loraserve.chat_template import ChatTemplate
from loraserve.engine.admission import LockedAdmission
from loraserve.engine.core_process.messages import AbortRequest, AddRequest, ForgetAdapter
from loraserve.engine.llm_engine import LLMEngine, StepOutput
from loraserve.engine.streams import NO_LOGPROBS, Logprobs, RequestEvents, Stream, event_logprobs
from loraserve.engine.text_face import TextFace
from loraserve.engine.weights.detokenizer import IncrementalDetokenizer
from loraserve.engine.weights.token_bytes import TokenBytes
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.types import (
    AdapterRef,
    FinishReason,
    ModelInfo,
    SamplingParams,
    StreamEvent,
)

EngineFactory = Callable[[], tuple[LLMEngine, Tokenizer]]


def model_info(engine: LLMEngine) -> ModelInfo:
    """What the server and the registry learn of a loaded engine."""
    cfg = engine.cfg
    return ModelInfo(context_window=engine.context_window, num_layers=cfg.num_layers,
                     vocab_size=cfg.vocab_size, lora_shapes=cfg.lora_shapes(), architecture=cfg.architecture,
                     weights="gguf" if engine.ecfg.dtype == "gguf"
                     else str(engine.dtype).removeprefix("torch."))


class AsyncEngine(TextFace, LockedAdmission):
    """Builds its engine on the step thread and runs every step there.

    Everything that touches torch happens on that one thread. OpenMP keeps a worker team per thread
    that runs parallel work; with a second team (say the loader's, on the main thread) there are more
    workers than cores on a small machine, libgomp stops spinning between parallel regions, and
    each of a step's ~1000 small ops pays a thread wake-up: steps got 50% slower.
    """

    def __init__(self, factory: EngineFactory, chat_template: ChatTemplate | None = None) -> None:
        self._streams: dict[str, Stream] = {}
        self._inbox: list[AddRequest | AbortRequest | ForgetAdapter] = []
        self._pending_adds = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._adapter_loaded = False  # set by the loader thread, read under the lock
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(factory,), name="engine-step", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error
        self.chat_template = chat_template or self.tokenizer.chat_template
        self._info = model_info(self.engine)
        self._stats: dict[str, float] = self.engine.stats()

    # -- Backend -----------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: AdapterRef | None = None, cache_salt: str | None = None,
                 session_id: str | None = None) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stopped:
                raise RuntimeError("engine is shut down")
            self._admit(len(prompt_token_ids), params.max_tokens)
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id}")
            stream = Stream(loop, asyncio.Queue(), IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
                            len(prompt_token_ids))
            self._streams[request_id] = stream
            self._inbox.append(AddRequest(request_id, list(prompt_token_ids), params, adapter, cache_salt,
                                          session_id))
            self._pending_adds += 1
            self._wake.notify()
        return RequestEvents(self.abort, request_id, stream)

    def _full(self) -> bool:
        # Requests still in the inbox count: the step thread has not handed them to the scheduler yet.
        return len(self.engine.scheduler.waiting) + self._pending_adds >= self.engine.ecfg.max_queue

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._streams:
                self._inbox.append(AbortRequest(request_id))
                self._wake.notify()

    def forget_adapter(self, key: str) -> None:
        with self._lock:
            self._inbox.append(ForgetAdapter(key))
            self._wake.notify()

    def holds_adapter(self, key: str) -> bool:
        """Whether a request for `key` queued now would find its adapter in memory (no load from disk).
        A forget still in the inbox counts as done: it reaches the engine before that request."""
        with self._lock:
            if any(isinstance(item, ForgetAdapter) and item.key == key for item in self._inbox):
                return False
            return self.engine.adapters.holds(key)

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self.engine.adapters.close()

    # -- the step thread ---------------------------------------------------------------------------
    def _run(self, factory: EngineFactory) -> None:
        try:
            self.engine, self.tokenizer = factory()
        except BaseException as exc:  # handed to the constructor, which re-raises it on the caller's thread
            self._build_error = exc
            return
        finally:
            self._ready.set()
        self.engine.adapters.on_loaded = self._on_adapter_loaded
        self._token_bytes = TokenBytes(self.tokenizer)
        self._loop()

    def _on_adapter_loaded(self) -> None:
        with self._lock:
            self._adapter_loaded = True
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._inbox and not self.engine.has_work():
                    self._wake.wait()
                # Work is waiting only for adapters being loaded: sleep until one is (or a request
                # comes or goes) instead of spinning; the timeout is a safety net, not the mechanism.
                if self.engine.stalled and not (self._stopped or self._inbox or self._adapter_loaded):
                    self._wake.wait(timeout=0.05)
                self._adapter_loaded = False
                if self._stopped:
                    break
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                self._apply(item)
            try:
                outputs = self.engine.step()
            except Exception as exc:  # never leave clients hanging: fail everything in flight
                self._fail_all(f"engine step failed: {exc!r}")
                continue
            self._stats = self.engine.stats()  # before the events: a finished request shows as freed
            for out in outputs:
                self._emit(out.seq.request_id, out.token, out.seq.finish_reason if out.finished else None,
                           out.seq.num_output, self.engine.adapters.failure(out.seq.adapter_key or ""),
                           self._logprobs(out), out.seq.num_cached_prompt)
        self._fail_all("engine is shut down")

    def _apply(self, item: AddRequest | AbortRequest | ForgetAdapter) -> None:
        if isinstance(item, AddRequest):
            with self._lock:
                self._pending_adds -= 1
            if item.request_id not in self._streams:
                return
            try:
                self.engine.add_request(item.request_id, item.prompt, item.params, item.adapter,
                                        item.cache_salt)
            except Exception as exc:
                self._emit(item.request_id, None, FinishReason.ERROR, 0, str(exc))
        elif isinstance(item, ForgetAdapter):
            self.engine.adapters.forget(item.key)
        else:
            self.engine.abort(item.request_id)
            self._emit(item.request_id, None, FinishReason.ABORT, 0, None)

    def _logprobs(self, out: StepOutput) -> Logprobs:
        return event_logprobs(self._token_bytes, out.logprobs, out.prompt_scores, out.seq.prompt_ids)

    def _emit(self, request_id: str, token: int | None, finish: FinishReason | None, num_output: int,
              error: str | None, logprobs: Logprobs = NO_LOGPROBS, cached_tokens: int = 0) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        event = stream.event(token, finish, num_output, error, logprobs, cached_tokens)
        if finish is not None:
            with self._lock:
                self._streams.pop(request_id, None)
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # its event loop is closed: nobody can read this stream any more
            if finish is None:
                self.engine.abort(request_id)
                stream.done = True
                with self._lock:
                    self._streams.pop(request_id, None)

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._emit(request_id, None, FinishReason.LOST, 0, message)

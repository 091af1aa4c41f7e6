"""The gateway's `Backend` over an engine deployment: what the API sees of a model served by Ray Serve
replicas.

Templating and tokenization happen here, with the model's own tokenizer read in the gateway (no torch),
as the engine-process client does. `generate` streams from one replica through a DeploymentHandle: a
request with a finetune carries the adapter's key as Serve's multiplexed model id, so Serve sends it to a
replica that holds the adapter (one that does not loads it on first use); base-model requests carry none
and go wherever the queue is shortest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from loraserve.chat_template import ChatTemplate
from loraserve.cluster.loads import ReplicaLoads
from loraserve.cluster.protocol import Refused, Started
from loraserve.cluster.replica_header import ServedBy, served_by
from loraserve.engine.core_process.client import load_tokenizer
from loraserve.engine.sources import tokenizer_file
from loraserve.engine.text_face import TextFace
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.errors import CapacityExceeded
from loraserve.types import (
    AdapterRef,
    FinishReason,
    ModelInfo,
    QueueFull,
    SamplingParams,
    StreamEvent,
    check_context_window,
)

logger = logging.getLogger("loraserve.cluster")


class ClusterBackend(TextFace):
    """Build it with `connect` on the gateway's event loop."""

    def __init__(self, handle: Any, info: ModelInfo, tokenizer: Tokenizer, template: ChatTemplate,
                 loads: ReplicaLoads, affinity: bool = True) -> None:
        self._handle = handle  # a DeploymentHandle of EngineReplica
        self._stream = handle.options(method_name="generate", stream=True)
        self._info = info
        self.tokenizer = tokenizer
        self.chat_template = template
        self._loads = loads
        self._affinity = affinity
        self._open: dict[str, RemoteEvents] = {}
        self._loop = asyncio.get_running_loop()
        self._background: set[asyncio.Future[Any]] = set()

    @classmethod
    async def connect(cls, handle: Any, source: str, template: ChatTemplate | None,
                      stats_interval_s: float, affinity: bool = True) -> ClusterBackend:
        """Reads the tokenizer here while a replica reports the model (a GGUF vocabulary takes seconds),
        and starts polling the replicas' gauges."""
        tokenizer = asyncio.create_task(asyncio.to_thread(load_tokenizer, tokenizer_file(source)))
        info: ModelInfo = await handle.options(method_name="info").remote()
        loaded = await tokenizer
        loads = ReplicaLoads(handle, stats_interval_s)
        loads.start()
        return cls(handle, info, loaded, template or loaded.chat_template, loads, affinity)

    async def close(self) -> None:
        await self._loads.close()

    # -- Backend -----------------------------------------------------------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: AdapterRef | None = None, cache_salt: str | None = None,
                 session_id: str | None = None) -> RemoteEvents:
        self.admit(len(prompt_token_ids), params.max_tokens)
        if request_id in self._open:
            raise ValueError(f"duplicate request id {request_id}")
        # Base-model requests name no model: Serve's router then ignores which adapters replicas hold.
        # Without affinity (ClusterConfig.adapter_affinity) a finetune's requests go the same way.
        handle = (self._stream if adapter is None or not self._affinity
                  else self._stream.options(multiplexed_model_id=adapter.key))
        response = handle.remote(request_id, list(prompt_token_ids), params, adapter, cache_salt, session_id)
        events = RemoteEvents(self, request_id, response, len(prompt_token_ids), served_by())
        self._open[request_id] = events
        return events

    def admit(self, prompt_tokens: int, max_tokens: int) -> None:
        check_context_window(prompt_tokens, max_tokens, self._info.context_window)
        if self.is_full():
            raise QueueFull()

    def is_full(self) -> bool:
        return self._loads.full()

    def abort(self, request_id: str) -> None:
        events = self._open.get(request_id)
        if events is not None:
            events.cancel()

    def forget_adapter(self, key: str) -> None:
        """Sent to every running replica; one that starts later starts with empty caches."""
        self._in_background(self._handle.broadcast("forget_adapter", key).results_async(
            return_exceptions=True))

    def stats(self) -> dict[str, float]:
        return self._loads.stats()

    # -- helpers -----------------------------------------------------------------------------------
    def _closed(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Runs `work` on the gateway's loop, from it or from a worker thread (blocking routes)."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            future: asyncio.Future[Any] = self._loop.create_task(work)
            self._background.add(future)
            future.add_done_callback(self._background.discard)
        else:
            asyncio.run_coroutine_threadsafe(work, self._loop)


class RemoteEvents:
    """One request's events from a replica. Closing it, or cancelling a read, before the last event
    cancels the Serve call, which aborts the engine request on the replica. Not an async generator: one
    closed before its first read would never run its cleanup.

    Serve's failures become what the API already answers: no replica can take the request (Serve's
    queue limit, or the replica's engine queue) is CapacityExceeded (429, 3040); a replica that failed
    under the request ends it with a LOST event (the API's "try again")."""

    def __init__(self, backend: ClusterBackend, request_id: str, response: Any, num_prompt: int,
                 served: ServedBy | None) -> None:
        self._backend = backend
        self._request_id = request_id
        self._response = response  # a DeploymentResponseGenerator
        self._num_prompt = num_prompt
        self._served = served
        self._completion_tokens = 0
        self._ended = False

    def __aiter__(self) -> RemoteEvents:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        try:
            event = await self._next_event()
        except BaseException:
            await self.aclose()
            raise
        self._completion_tokens = event.completion_tokens
        if event.finish_reason is not None:
            self._end()
        return event

    async def _next_event(self) -> StreamEvent:
        while True:
            try:
                item = await anext(self._response)
            except StopAsyncIteration:
                return self._lost("the engine replica ended the stream before the request finished")
            except (BackPressureError, DeploymentUnavailableError):
                raise CapacityExceeded() from None
            except RequestCancelledError:
                return StreamEvent("", self._num_prompt, self._completion_tokens, FinishReason.ABORT)
            except RayError as exc:  # the replica died, or failed under the request
                logger.error("engine replica failed under request %s: %r", self._request_id, exc)
                return self._lost(f"the engine replica failed: {type(exc).__name__}")
            if isinstance(item, Started | Refused):
                if self._served is not None:
                    self._served.replica = item.replica
                if isinstance(item, Refused):
                    raise CapacityExceeded()
                continue
            if not isinstance(item, StreamEvent):
                raise TypeError(f"an engine replica streamed {type(item).__name__}, not a StreamEvent")
            return item

    def _lost(self, message: str) -> StreamEvent:
        return StreamEvent("", self._num_prompt, self._completion_tokens, FinishReason.LOST, message)

    def cancel(self) -> None:
        if not self._ended:
            self._end()
            self._response.cancel()

    async def aclose(self) -> None:
        self.cancel()

    def _end(self) -> None:
        self._ended = True
        self._backend._closed(self._request_id)

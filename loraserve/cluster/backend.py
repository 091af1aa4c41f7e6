"""The gateway's `Backend` over an engine deployment: what the API sees of a model served by Ray Serve
replicas.

Templating and tokenization happen here, with the model's own tokenizer read in the gateway (no torch),
as the engine-process client does. `generate` streams from one replica through a DeploymentHandle: a
request with a finetune carries the adapter's key as Serve's multiplexed model id, so Serve sends it to a
replica that holds the adapter (one that does not loads it on first use); base-model requests carry none
and go wherever the queue is shortest; a request with a session key goes to its session's replica
(router.py). A replica that dies before the request streamed anything costs
the caller nothing: the request is sent again (remote_events.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from loraserve.api.metrics_replicas import AdapterRouting, ReplicaStats
from loraserve.chat_template import ChatTemplate
from loraserve.cluster.loads import ReplicaLoads
from loraserve.cluster.remote_events import RemoteEvents
from loraserve.cluster.replica_header import served_by
from loraserve.cluster.router import SESSION_KWARG
from loraserve.engine.core_process.client import load_tokenizer
from loraserve.engine.sources import tokenizer_file
from loraserve.engine.text_face import TextFace
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.types import (
    AdapterRef,
    ModelInfo,
    QueueFull,
    SamplingParams,
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
        self._retries = 0  # requests sent again after their replica died (remote_events.py)
        self._routed: dict[tuple[str, AdapterRouting], int] = {}  # requests started, per replica and routing

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
        prompt = list(prompt_token_ids)

        def send() -> Any:  # again for a retry, when the replica died before the request streamed anything
            # By keyword: the router reads a session's key from it (router.py).
            return handle.remote(request_id, prompt, params, adapter, cache_salt,
                                 **{SESSION_KWARG: session_id})

        events = RemoteEvents(self, request_id, send, len(prompt), served_by())
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
        return {**self._loads.stats(), "request_retries": float(self._retries)}

    def replica_stats(self) -> list[ReplicaStats]:
        """Each replica's gauges as last polled, and the requests this gateway saw it start (kept for
        replicas gone since: counters never vanish)."""
        routed = dict(self._routed)  # one copy, atomic under the GIL: requests start on the loop meanwhile
        engines = {load.replica: load.stats for load in self._loads.replicas()}
        return [ReplicaStats(replica, engines.get(replica, {}),
                             {routing: count for (name, routing), count in routed.items() if name == replica})
                for replica in sorted(engines.keys() | {name for name, _ in routed})]

    # -- helpers -----------------------------------------------------------------------------------
    def _retried(self) -> None:
        self._retries += 1

    def _started_on(self, replica: str, adapter_resident: bool | None) -> None:
        key = (replica, AdapterRouting.of(adapter_resident))
        self._routed[key] = self._routed.get(key, 0) + 1

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

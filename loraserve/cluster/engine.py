"""The engine deployment: one AsyncEngine per Ray Serve replica (its step loop on its own thread).

A request with a finetune arrives with the adapter's key as Serve's multiplexed model id; the replica
marks the adapter resident through `serve.multiplexed`, which is what Serve's router reads to send the
adapter's next requests here. Loading the weights is left to the engine (its disk → host → device tiers,
off the step thread), so the multiplexed loader returns at once: Serve runs one load at a time per replica.
With an adapter store, the replica first fetches the version the request names into its machine's cache
tier (adapters.py).

torch is imported in the replica's constructor only: the gateway and the deploying process import this
module (to name the deployment) without it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ray import serve

from loraserve.cluster.adapters import ReplicaAdapters, fetch_failed
from loraserve.cluster.protocol import Refused, ReplicaLoad, Started, StreamItem
from loraserve.engine.config import EngineConfig
from loraserve.errors import WorkersAIError
from loraserve.types import AdapterRef, ModelInfo, QueueFull, SamplingParams

if TYPE_CHECKING:
    from loraserve.engine.async_engine import AsyncEngine


class _Resident:
    """An adapter that Serve's multiplexing counts as resident on this replica. Serve's LRU evicting it
    drops it from the engine's caches too (forget leaves pinned copies alone), so that the replicas the
    router prefers for an adapter are the ones whose engine still holds it."""

    def __init__(self, forget: Callable[[str], None], key: str) -> None:
        self._forget = forget
        self._key = key
        self._gone = False

    def __del__(self) -> None:
        # Serve calls it when it evicts the adapter; the garbage collector calls it once more later.
        if not self._gone:
            self._gone = True
            self._forget(self._key)


class EngineReplica:
    """Made a deployment by the application builder (app.py), with its options."""

    def __init__(self, source: str, config: EngineConfig, adapters_resident: int) -> None:
        from loraserve.engine.loader import load_backend  # torch: in the engine replicas only

        self._engine: AsyncEngine = load_backend(source, config)
        self._replica = serve.get_replica_context().replica_id.unique_id
        forget = self._engine.forget_adapter
        self._adapters = ReplicaAdapters(forget)  # adapters fetched from the store (adapters.py)

        async def resident(key: str) -> _Resident:
            return _Resident(forget, key)

        # Wrapped here rather than decorating a method: the LRU's size is an option of the application.
        self._resident = serve.multiplexed(max_num_models_per_replica=adapters_resident)(resident)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: AdapterRef | None, cache_salt: str | None,
                       session_id: str | None) -> AsyncIterator[StreamItem]:
        """`Started` (or `Refused`), then the engine's StreamEvents. Cancelled (the client went away) or
        closed before the last event, the engine request is aborted at once."""
        if adapter is not None:
            try:
                adapter = await self._adapters.local(adapter)
            except WorkersAIError as exc:  # not fetched from the adapter store
                for item in fetch_failed(exc, self._replica, len(prompt_token_ids)):
                    yield item
                return
            await self._resident(adapter.key)
        # Asked before the engine has the request: what the router's choice found here, not what it did.
        resident = None if adapter is None else self._engine.holds_adapter(adapter.key)
        try:
            events = self._engine.generate(request_id, prompt_token_ids, params, adapter, cache_salt,
                                           session_id)
        except QueueFull:
            yield Refused(self._replica)
            return
        yield Started(self._replica, resident)
        try:
            async for event in events:
                yield event
        finally:
            self._engine.abort(request_id)  # a no-op once the request finished

    async def info(self) -> ModelInfo:
        return self._engine.info

    async def stats(self) -> ReplicaLoad:
        return ReplicaLoad(self._replica, self._engine.stats(), self._engine.is_full())

    async def forget_adapter(self, key: str) -> None:
        self._engine.forget_adapter(key)

    def __del__(self) -> None:
        # Serve calls it when the replica stops: streams still open end with an error event (LOST), which
        # the gateway answers as 3040, "try again".
        engine = getattr(self, "_engine", None)  # absent when loading failed
        if engine is not None:
            engine.shutdown()

    async def check_health(self) -> None:
        # Takes the engine's lock: a replica whose engine deadlocked fails Serve's check by its timeout
        # and is replaced. (Methods are async: Serve runs them on the replica's loop, not a thread pool.)
        self._engine.is_full()

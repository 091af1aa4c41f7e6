"""Adapter files for engine replicas on other machines than the gateway's.

With an adapter store (`ClusterConfig.adapter_store`), the gateway's registry (`GatewayRegistry`) hands a
run a `StoredAdapter`: the finetune's key, and the version of each file the database records (sha256,
size), with the store's URL and the replicas' cache directory. The engine replica that takes the request
fetches that version into its machine's cache tier (`ReplicaAdapters`, through the registry's own
RemoteStore.materialize: flock per finetune, temp file, sha256 and size checked, atomic rename) before its
engine reads it; a copy already there is used as it is. Because the version travels with each request, a
replica that held an older copy fetches the new one after a re-upload, and has its engine load it anew
rather than serve the weights it holds under the same key. With a byte budget
(`ClusterConfig.replica_cache_bytes`), each fetch is followed by pruning the cache, least recently used
finetunes first, sparing any a replica may be about to read (replica_cache.py).

Without a store, runs carry the gateway's AdapterRef unchanged: its path is on the gateway's machine, so
the replicas must share its filesystem.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.protocol import Refused, Started, StreamItem
from loraserve.cluster.replica_cache import ReplicaCache
from loraserve.errors import CapacityExceeded, InvalidFinetune, WorkersAIError
from loraserve.registry import Registry
from loraserve.registry.records import AssetFile, Finetune
from loraserve.registry.storage import AssetDigest, FinetuneStorage
from loraserve.registry.store import AdapterStoreConfig, LocalStore
from loraserve.types import AdapterRef, FinishReason, StreamEvent

if TYPE_CHECKING:
    from loraserve.registry.store_remote import RemoteStore

log = logging.getLogger(__name__)

# What a StoredAdapter pins: every file of the adapter, at the version the database recorded.
Version = tuple[tuple[AssetFile, AssetDigest], ...]
# Fetches of one request's adapter before it gives up: another is needed only when the copy was evicted
# between the fetch and the check that follows it (a fetch longer than replica_cache.GRACE_S).
MAX_FETCHES = 3


@dataclass(frozen=True)
class StoredAdapter(AdapterRef):
    """An adapter in the store, which a replica fetches at `version` from `store` into `cache_dir` (a path
    on the replica's machine), pruned to `cache_bytes` (None: never). `path` names the gateway's tier,
    where the gateway keeps no copy."""

    store: str
    cache_dir: str
    version: Version
    cache_bytes: int | None = None


class GatewayRegistry(Registry):
    """The gateway's registry: with an adapter store, a run's adapter is a StoredAdapter."""

    replica_cache: Path | None = None  # None: runs carry the gateway's AdapterRef
    replica_cache_bytes: int | None = None

    @classmethod
    def for_cluster(cls, config: ClusterConfig) -> GatewayRegistry:
        registry = cls.open(config.data_dir, config.database_url, config.limits, config.adapter_store_config)
        assert isinstance(registry, GatewayRegistry)  # `open` builds `cls`
        registry.replica_cache = config.replica_cache
        registry.replica_cache_bytes = config.replica_cache_bytes
        return registry

    def adapter_for(self, account_id: str, model: str, ref: str) -> tuple[Finetune, AdapterRef]:
        if self.replica_cache is None or isinstance(self.store, LocalStore):
            return super().adapter_for(account_id, model, ref)
        # The replicas fetch the files; the gateway never reads them, so it keeps no copy of its own.
        finetune = self.finetune_for_run(account_id, model, ref)
        # The database's record is the truth: what the gateway's own tier holds (an upload's copy) may be
        # an older version by now.
        digests = self._digests(finetune.id)
        if missing := [file for file in AssetFile if file not in digests]:  # re-validated or deleted since
            names = " and ".join(file.value for file in missing)
            raise InvalidFinetune(f"finetune {finetune.id} is missing {names}")
        version = tuple((file, digests[file]) for file in AssetFile)
        return finetune, StoredAdapter(finetune.id, str(self.storage.directory(finetune.id)), self.store.name,
                                       str(self.replica_cache), version, self.replica_cache_bytes)


class ReplicaAdapters:
    """One engine replica's view of the store. `forget` drops a key from the engine's caches."""

    def __init__(self, forget: Callable[[str], None]) -> None:
        self._forget = forget
        self._stores: dict[tuple[str, str], tuple[RemoteStore, ReplicaCache]] = {}
        # One fetch per adapter version at a time in this replica, awaited by every request that needs it
        # (the finetune's flock serialises fetches across the machine's replicas).
        self._fetching: dict[tuple[str, str, Version], asyncio.Task[None]] = {}
        self._handed: dict[str, Version] = {}  # the version the engine was last given, per key

    async def local(self, adapter: AdapterRef) -> AdapterRef:
        """The adapter as this replica's engine reads it: a StoredAdapter's version fetched into the
        machine's cache tier first (off the event loop), any other ref as it is. Raises InvalidFinetune
        (the object is missing from the store, or does not match its record) or CapacityExceeded (the
        store is unreachable, or the local disk failed)."""
        if not isinstance(adapter, StoredAdapter):
            return adapter
        try:
            store, cache = self._store(adapter.store, adapter.cache_dir)
            for fetches in itertools.count():
                # Marked before the check: an eviction either sees the mark and keeps the copy for the
                # engine, or ran first, and the check finds no copy.
                if not cache.mark(adapter.key, wait=False):  # an eviction holds it: wait off the loop
                    await asyncio.to_thread(cache.mark, adapter.key)
                if all(store.cache.current(adapter.key, file, digest) for file, digest in adapter.version):
                    break
                if fetches == MAX_FETCHES:
                    log.warning("adapter %s was evicted from %s after each of %d fetches", adapter.key,
                                adapter.cache_dir, fetches)
                    raise CapacityExceeded()
                await asyncio.shield(self._fetch(store, cache, adapter))
        except WorkersAIError:
            raise  # the store's own failures, logged where they happened (RemoteStore.reachable)
        except (OSError, ValueError) as exc:  # this machine's disk, or fsspec's package missing here
            log.warning("adapter %s could not be cached in %s: %r", adapter.key, adapter.cache_dir, exc)
            raise CapacityExceeded() from exc
        if self._handed.setdefault(adapter.key, adapter.version) != adapter.version:
            self._forget(adapter.key)  # queued before this request: the engine loads this version anew
            self._handed[adapter.key] = adapter.version
        return AdapterRef(adapter.key, str(store.storage.directory(adapter.key)))

    def _fetch(self, store: RemoteStore, cache: ReplicaCache, adapter: StoredAdapter) -> asyncio.Task[None]:
        wanted = (adapter.store, adapter.key, adapter.version)
        task = self._fetching.get(wanted)
        if task is None:
            digests = dict(adapter.version)

            def fetch() -> None:
                try:
                    store.materialize(adapter.key, tuple(digests), lambda: digests)
                except OSError:  # this disk: full, perhaps, and the next try may fit once pruned
                    _prune(cache, adapter.cache_bytes)
                    raise
                _prune(cache, adapter.cache_bytes)

            task = asyncio.create_task(asyncio.to_thread(fetch))
            self._fetching[wanted] = task
            task.add_done_callback(lambda done: self._fetched(wanted, done))
        return task

    def _fetched(self, wanted: tuple[str, str, Version], task: asyncio.Task[None]) -> None:
        if self._fetching.get(wanted) is task:
            del self._fetching[wanted]
        if not task.cancelled():
            task.exception()  # retrieved here: every request awaiting it may have gone away

    def _store(self, url: str, cache_dir: str) -> tuple[RemoteStore, ReplicaCache]:
        from loraserve.registry.store_remote import RemoteStore  # fsspec: only with a store configured

        found = self._stores.get((url, cache_dir))
        if found is None:
            storage = FinetuneStorage(Path(cache_dir))
            found = RemoteStore(storage, AdapterStoreConfig(url)), ReplicaCache(storage)
            self._stores[(url, cache_dir)] = found
        return found


def _prune(cache: ReplicaCache, budget: int | None) -> None:
    """After a fetch, on its thread: the requests awaiting the fetch wait for this too, a scan of the
    cache's directories (a few tenths of a second for 10,000). A failure only leaves the cache over budget
    until the next fetch: the request has its copy."""
    if budget is None:
        return
    try:
        cache.prune(budget)
    except OSError as exc:
        log.warning("replica cache %s could not be pruned: %r", cache.storage.root, exc)


def fetch_failed(error: WorkersAIError, replica: str, prompt_tokens: int) -> tuple[StreamItem, ...]:
    """What a replica streams for a request whose adapter it could not fetch, as the API answers a local
    store's failures: a missing or altered object ends the run as an adapter that would not load (400 /
    3039, the message naming what is wrong); an unreachable store or disk refuses it (429 / 3040)."""
    if isinstance(error, InvalidFinetune):
        return (Started(replica, adapter_resident=False),
                StreamEvent("", prompt_tokens, 0, FinishReason.ERROR, error.message))
    return (Refused(replica, error.message),)

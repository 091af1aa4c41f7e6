"""The replica cache's byte budget (replica_cache.py), on real files and without Ray: engine replicas
(`ReplicaAdapters`, as many as the machine runs, sharing one cache directory) fetch from a `file://` store;
what goes is the least recently used, never what a replica is fetching, marking or marked within the grace
period, and a copy `local()` hands an engine is complete whatever evictions run alongside.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from loraserve.cluster.adapters import ReplicaAdapters, StoredAdapter
from loraserve.cluster.replica_cache import EVICTED_PREFIX, GRACE_S, MARK, ReplicaCache
from loraserve.registry.records import AssetFile
from loraserve.registry.storage import AssetDigest, FinetuneStorage
from loraserve.registry.store_cache import CacheTier
from loraserve.types import AdapterRef

CONFIG = b'{"r": 8, "lora_alpha": 16}'
WEIGHTS_BYTES = 1000
SIZE = len(CONFIG) + WEIGHTS_BYTES  # one cached finetune's bytes (its mark is empty)


class Store:
    """A `file://` adapter store and the machine's cache directory its replicas share."""

    def __init__(self, root: Path) -> None:
        self.root, self.cache_dir = root / "store", root / "cache"
        self.cache = ReplicaCache(FinetuneStorage(self.cache_dir))

    def put(self, seed: int, budget: int | None = None) -> StoredAdapter:
        """A new finetune in the store, as a gateway's run names it."""
        finetune_id = str(uuid.uuid4())
        version = []
        for file, blob in ((AssetFile.CONFIG, CONFIG), (AssetFile.WEIGHTS, bytes([seed]) * WEIGHTS_BYTES)):
            digest = AssetDigest(len(blob), hashlib.sha256(blob).hexdigest())
            key = self.root / finetune_id / digest.sha256 / file.value
            key.parent.mkdir(parents=True)
            key.write_bytes(blob)
            version.append((file, digest))
        return StoredAdapter(finetune_id, "/the/gateway's/copy", f"file://{self.root}", str(self.cache_dir),
                             tuple(version), budget)

    def age(self, adapter: StoredAdapter, seconds: float) -> None:
        """Last used `seconds` ago."""
        used = time.time() - seconds
        os.utime(self.cache_dir / adapter.key / MARK, (used, used))

    def complete(self, adapter: StoredAdapter) -> bool:
        """Whether the engine's paths hold the version the adapter names, every byte of it."""
        tier = CacheTier(FinetuneStorage(self.cache_dir))
        for file, digest in adapter.version:
            if not tier.current(adapter.key, file, digest):
                return False
            path = self.cache_dir / adapter.key / file.value
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest.sha256:
                return False
        return True

    def cached(self) -> set[str]:
        return {entry.finetune_id for entry in self.cache.scan()}

    def total(self) -> int:
        return sum(entry.size for entry in self.cache.scan())


def local(adapters: ReplicaAdapters, adapter: StoredAdapter) -> AdapterRef:
    return asyncio.run(adapters.local(adapter))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def test_the_least_recently_used_go_until_the_cache_fits(store: Store) -> None:
    adapters = ReplicaAdapters(lambda key: None)
    finetunes = [store.put(seed) for seed in range(4)]
    for hours, adapter in zip((4, 3, 2, 1), finetunes, strict=True):
        assert local(adapters, adapter) == AdapterRef(adapter.key, str(store.cache_dir / adapter.key))
        store.age(adapter, hours * 3600)
    assert store.total() == 4 * SIZE
    leftover = store.cache_dir / f"{EVICTED_PREFIX}0123"  # a pruning that died mid-way
    (leftover / "blob").parent.mkdir()
    (leftover / "blob").write_bytes(b"x")
    assert store.cache.prune(2 * SIZE + 1) == [finetunes[0].key, finetunes[1].key]
    assert store.cached() == {finetunes[2].key, finetunes[3].key} and store.total() == 2 * SIZE
    assert not leftover.exists() and not (store.cache_dir / finetunes[0].key).exists()
    assert all(store.complete(adapter) for adapter in finetunes[2:])
    assert store.cache.prune(2 * SIZE) == []  # within budget: nothing more goes


def test_a_finetune_fetched_marked_or_used_within_the_grace_period_stays(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    adapters = ReplicaAdapters(lambda key: None)
    fetching, marking, recent, old = finetunes = [store.put(seed) for seed in range(4)]
    for adapter in finetunes:
        local(adapters, adapter)
    for adapter in (fetching, marking, old):
        store.age(adapter, 2 * GRACE_S)
    store.age(recent, GRACE_S / 2)
    storage = FinetuneStorage(store.cache_dir)
    # A fetch holds the finetune's lock (RemoteStore.materialize); a replica marking it holds its mark.
    mark = os.open(store.cache_dir / marking.key / MARK, os.O_RDONLY)
    try:
        with storage.locked(fetching.key):
            fcntl.flock(mark, fcntl.LOCK_SH)
            with caplog.at_level(logging.WARNING, "loraserve.cluster.replica_cache"):
                assert store.cache.prune(1) == [old.key]
    finally:
        os.close(mark)
    assert "over its budget" in caplog.text
    assert store.cached() == {fetching.key, marking.key, recent.key}
    assert sorted(store.cache.prune(1)) == sorted([fetching.key, marking.key])
    assert store.cached() == {recent.key} and store.complete(recent)


def test_a_mark_waits_for_an_eviction_under_way_and_a_marked_copy_is_not_evicted(store: Store) -> None:
    adapters = ReplicaAdapters(lambda key: None)
    adapter = store.put(1)
    local(adapters, adapter)
    store.age(adapter, 2 * GRACE_S)
    evicting = os.open(store.cache_dir / adapter.key / MARK, os.O_RDONLY)
    try:
        fcntl.flock(evicting, fcntl.LOCK_EX)
        assert not store.cache.mark(adapter.key, wait=False)  # the event loop's try: it would wait
    finally:
        os.close(evicting)
    assert store.cache.mark(adapter.key, wait=False)
    assert store.cache.evict(adapter.key) is None and store.complete(adapter)


def test_replicas_sharing_a_cache_keep_it_within_budget(store: Store) -> None:
    """Two replicas of one machine: each fetch prunes what either fetched; a copy evicted under a replica
    is fetched again, the same version, so its engine is not told to forget it."""
    forgotten: list[str] = []
    first, second = ReplicaAdapters(forgotten.append), ReplicaAdapters(forgotten.append)
    budget = 2 * SIZE
    a, b, c = (store.put(seed, budget) for seed in range(3))
    local(first, a)
    store.age(a, 3 * GRACE_S)
    local(second, b)
    store.age(b, 2 * GRACE_S)
    assert store.cached() == {a.key, b.key}
    local(first, c)  # over budget: the least recently used, a, goes
    assert store.cached() == {b.key, c.key} and store.total() <= budget
    store.age(c, 2 * GRACE_S)
    local(first, a)  # fetched again; b, used before c, goes
    assert store.cached() == {a.key, c.key} and store.complete(a) and store.total() <= budget
    local(second, a)
    assert store.complete(a) and forgotten == []
    unbounded = store.put(9)  # a run with no budget prunes nothing
    local(second, unbounded)
    assert store.cached() == {a.key, c.key, unbounded.key}


def test_fetches_racing_evictions_of_the_same_finetune_hand_out_complete_copies(store: Store) -> None:
    """Two replicas fetch a finetune whose last use is old while a third process evicts it, released
    together, many times over: whichever comes first, what `local()` returns is complete at once and
    stays so (its mark keeps it), and no eviction leaves a half-removed copy behind."""
    replicas = [ReplicaAdapters(lambda key: None) for _ in range(2)]
    evictor = ReplicaCache(FinetuneStorage(store.cache_dir))
    adapter = store.put(7)
    local(replicas[0], adapter)
    rounds, evicted, failures = 40, [], []
    start = threading.Barrier(3, timeout=60)  # a failing thread must not hang the others

    def fetch(replica: ReplicaAdapters) -> None:
        for _ in range(rounds):
            start.wait()
            ref = local(replica, adapter)
            if not (Path(ref.path) == store.cache_dir / adapter.key and store.complete(adapter)):
                failures.append("incomplete copy handed out")
            start.wait()

    def evict() -> None:
        for _ in range(rounds):
            store.age(adapter, 2 * GRACE_S)  # the replicas are parked at the barrier: nobody marks now
            start.wait()
            evicted.append(evictor.evict(adapter.key) is not None)
            start.wait()
            if not store.complete(adapter):
                failures.append("evicted after local() returned it")

    threads = [threading.Thread(target=fetch, args=(replica,)) for replica in replicas]
    threads.append(threading.Thread(target=evict))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(evicted) == rounds
    assert not list(store.cache_dir.glob(f"{EVICTED_PREFIX}*"))

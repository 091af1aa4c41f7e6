"""The tiered adapter cache: device slots (pinned while used, LRU) <- host memory (LRU) <- disk.

Adapters are mapped and checked on a background thread (adapter_file.py: views of the file, no copy),
so a step never waits on a file read; the scheduler admits a request once its adapter is in host
memory, and `pin` then writes it into a device slot unless it is resident already: one pass over its
weights, which folds in the scale and, for the CPU kernel, packs (~5 ms for a float32 SmolLM2 adapter).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loraserve.engine.config import EngineConfig, ModelConfig
from loraserve.engine.core.adapter_slots import SlotTable
from loraserve.engine.core.scheduler import AdapterState
from loraserve.engine.lora.adapter_file import load_adapter
from loraserve.engine.lora.pool import LoraBackend, LoraPool, LoraWeights, rank_bucket
from loraserve.types import AdapterRef


class AdapterCache:
    def __init__(self, cfg: ModelConfig, ecfg: EngineConfig, dtype: torch.dtype, device: torch.device,
                 backend: LoraBackend) -> None:
        # dtype: the slots' (EngineConfig.lora_dtype, else the model's); loads check adapters' range
        # against it
        self.cfg, self.ecfg, self.dtype, self.device = cfg, ecfg, dtype, device
        self.backend = backend  # the pools' layout and how a step applies them
        self._refs: dict[str, AdapterRef] = {}
        self._host: OrderedDict[str, LoraWeights] = OrderedDict()
        self._host_bytes = 0
        self._loading: dict[str, Future[LoraWeights]] = {}
        self._failed: dict[str, str] = {}
        # Failed because a file was missing: the files may come back (a cluster replica's cache fetches an
        # evicted copy again), so the next request for the key loads it anew instead of failing too.
        self._missing: set[str] = set()
        self._pools: dict[int, tuple[LoraPool, SlotTable]] = {}
        self._bucket: dict[str, int] = {}  # adapter key -> rank bucket of the pool holding its slot
        self._lock = threading.Lock()  # guards _refs against the server thread's register/forget
        self._loader = _single_thread_loader()
        # Totals since the engine started: loads from disk submitted, and the loader thread's seconds on
        # them (a float written on that thread alone; readers may see it one load behind).
        self._loads = 0
        self._load_seconds = 0.0
        self._hits = 0  # requests whose adapter was in host memory when the engine took them
        # Called on the loader thread when an adapter finishes loading (or fails): an idle step loop
        # waiting for it wakes up instead of spinning, which would starve the loader of the GIL.
        self.on_loaded: Callable[[], None] | None = None

    def register(self, ref: AdapterRef) -> None:
        """Called once per request (LLMEngine.add_request, on the step thread): counts a hit when the
        adapter is in host memory already, so the request needs no load from disk."""
        if self.holds(ref.key):
            self._hits += 1
        if ref.key in self._missing:
            self._missing.discard(ref.key)
            self._failed.pop(ref.key, None)
        with self._lock:
            self._refs[ref.key] = ref

    def holds(self, key: str) -> bool:
        """Whether `key` is in host memory: a request for it now needs no load from disk. Safe from any
        thread: one dict lookup, atomic under the GIL; the answer may be a step old."""
        return key in self._host

    def failure(self, key: str) -> str | None:
        return self._failed.get(key)

    # AdapterGate, called from the step thread only.
    def state(self, key: str) -> AdapterState:
        if key in self._host:
            self._host.move_to_end(key)
            return AdapterState.READY
        if key in self._failed:
            return AdapterState.FAILED
        fut = self._loading.get(key)
        if fut is None:
            with self._lock:
                ref = self._refs.get(key)
            if ref is None:
                self._failed[key] = "adapter is not registered"
                return AdapterState.FAILED
            fut = self._loading[key] = self._loader.submit(self._load, ref)
            self._loads += 1
            fut.add_done_callback(self._loaded)
            return AdapterState.LOADING
        if not fut.done():
            return AdapterState.LOADING
        del self._loading[key]
        try:
            w = fut.result()
        except Exception as exc:  # a broken file must fail its requests, not the engine
            self._failed[key] = f"adapter could not be loaded: {exc}"
            if isinstance(exc, FileNotFoundError):
                self._missing.add(key)
            return AdapterState.FAILED
        if w.rank > self.ecfg.max_lora_rank:
            self._failed[key] = (f"adapter rank {w.rank} exceeds this engine's max_lora_rank "
                                 f"{self.ecfg.max_lora_rank}")
            return AdapterState.FAILED
        self._put_host(w)
        return AdapterState.READY

    def pin(self, key: str) -> bool:
        w = self._host[key]
        bucket = rank_bucket(w.rank)
        pool, table = self._pool_for(bucket)
        got = table.acquire(key)
        if got is None:
            return False
        slot, needs_load, evicted = got
        if evicted is not None:
            self._bucket.pop(evicted, None)
        self._bucket[key] = bucket
        if needs_load:
            pool.write(slot, w)
        return True

    def unpin(self, key: str) -> None:
        self._pools[self._bucket[key]][1].release(key)

    def slot(self, key: str) -> tuple[LoraPool, int]:
        pool, table = self._pools[self._bucket[key]]
        s = table.slot_of(key)
        if s is None:
            raise KeyError(key)
        return pool, s

    def forget(self, key: str) -> None:
        """A deleted or replaced finetune: drop it from every tier it is not pinned in."""
        with self._lock:
            self._refs.pop(key, None)
        self._failed.pop(key, None)
        self._missing.discard(key)
        w = self._host.pop(key, None)
        if w is not None:
            self._host_bytes -= w.nbytes
        if key in self._bucket:
            _, table = self._pools[self._bucket[key]]
            if table.drop(key):
                del self._bucket[key]

    def stats(self) -> dict[str, float]:
        return {
            "adapters_host": float(len(self._host)),
            "adapters_device": float(sum(len(t.resident) for _, t in self._pools.values())),
            "adapters_pinned": float(sum(t.num_pinned for _, t in self._pools.values())),
            "adapter_host_bytes": float(self._host_bytes),
            "adapter_loads": float(self._loads),
            "adapter_hits": float(self._hits),
            "adapter_load_seconds": self._load_seconds,
        }

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    def _load(self, ref: AdapterRef) -> LoraWeights:
        started = time.perf_counter()
        try:
            return load_adapter(ref, self.cfg, self.dtype)
        finally:
            self._load_seconds += time.perf_counter() - started

    def _loaded(self, _: Future[LoraWeights]) -> None:
        if self.on_loaded is not None:
            self.on_loaded()

    def _put_host(self, w: LoraWeights) -> None:
        self._host[w.key] = w
        self._host_bytes += w.nbytes
        # Keep at least the newest adapter even if it alone is over budget: it is needed right now.
        while self._host_bytes > self.ecfg.adapter_host_cache_bytes and len(self._host) > 1:
            _, old = self._host.popitem(last=False)
            self._host_bytes -= old.nbytes

    def pool_capacity(self, bucket: int) -> int:
        """Slots of the rank-`bucket` pool: as many as `lora_slot_bytes` holds, at most `max_loras`."""
        per_slot = LoraPool.slot_bytes(self.cfg, bucket, self.dtype.itemsize, self.backend)
        return max(1, min(self.ecfg.max_loras, self.ecfg.lora_slot_bytes // per_slot))

    def _pool_for(self, bucket: int) -> tuple[LoraPool, SlotTable]:
        if bucket not in self._pools:
            capacity = self.pool_capacity(bucket)
            pool = LoraPool(self.cfg, bucket, capacity, self.dtype, self.device, self.backend)
            self._pools[bucket] = (pool, SlotTable(capacity))
        return self._pools[bucket]


def _single_thread_loader() -> ThreadPoolExecutor:
    """A one-worker pool whose thread runs torch ops on one thread: it must not start an OpenMP team of
    its own (see async_engine.py).

    `torch.set_num_threads` also sets the process-wide default that every thread reads the first time
    it runs a parallel op. Left at 1, any thread starting torch work later ran single-threaded: the
    benchmark's roofline and HF baseline did, and their ceilings came out far too low. So the
    worker starts now, and the caller's own count is set back as the default once it has.
    """
    restore = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load",
                              initializer=torch.set_num_threads, initargs=(1,))
    pool.submit(torch.get_num_threads).result()
    torch.set_num_threads(restore)
    return pool

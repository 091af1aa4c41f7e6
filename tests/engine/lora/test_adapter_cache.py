"""The adapter cache's loader thread and the process's torch thread count."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraserve.catalog import RANDOM_SHAPES
from loraserve.engine.config import EngineConfig, ModelConfig
from loraserve.engine.core.scheduler import AdapterState
from loraserve.engine.lora.cache import AdapterCache
from loraserve.engine.lora.gemm import GemmLora
from loraserve.types import AdapterRef


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads_of_a_new_thread() -> int:
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def test_the_loader_runs_on_one_thread_without_changing_other_threads(two_threads: None) -> None:
    # The loader sets torch's thread count to 1 for itself; torch also keeps that as the default that
    # threads starting later pick up. The benchmark's roofline and HF baseline, run on a thread that
    # first used torch after the engine, were measured on one thread before the cache restored it.
    cache = AdapterCache(ModelConfig(vocab_size=128, **RANDOM_SHAPES["tiny"]), EngineConfig(), torch.float32,
                         torch.device("cpu"), GemmLora())
    try:
        assert cache._loader.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
        assert _threads_of_a_new_thread() == 2
    finally:
        cache.close()


def _cache_with_an_adapter_file(tmp_path: Path) -> AdapterCache:
    from loraserve.registry import synth

    shape = RANDOM_SHAPES["tiny"]
    info = synth.llama_model_info(num_layers=shape["num_layers"], hidden=shape["hidden_size"],
                                  intermediate=shape["intermediate_size"], heads=shape["num_heads"],
                                  kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"])
    (tmp_path / "adapter_config.json").write_bytes(synth.adapter_config(8, 16))
    weights = synth.encode_safetensors(synth.lora_tensors(info, 8))
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    return AdapterCache(ModelConfig(vocab_size=128, **shape), EngineConfig(), torch.float32,
                        torch.device("cpu"), GemmLora())


def test_loads_from_disk_are_counted_with_their_time(tmp_path: Path) -> None:
    cache = _cache_with_an_adapter_file(tmp_path)
    try:
        cache.register(AdapterRef("a", str(tmp_path)))
        assert cache.stats()["adapter_loads"] == 0
        _until_ready(cache, "a")
        assert cache._loader.submit(lambda: None).result() is None  # the loader's timing is written
        first = cache.stats()
        assert first["adapter_loads"] == 1 and first["adapter_load_seconds"] > 0
        _until_ready(cache, "a")  # in host memory now: no second load
        assert cache.stats()["adapter_loads"] == 1
        cache.forget("a")
        cache.register(AdapterRef("a", str(tmp_path)))
        _until_ready(cache, "a")
        assert cache.stats()["adapter_loads"] == 2
    finally:
        cache.close()


def test_requests_finding_their_adapter_in_memory_are_hits(tmp_path: Path) -> None:
    cache = _cache_with_an_adapter_file(tmp_path)
    ref = AdapterRef("a", str(tmp_path))
    try:
        assert not cache.holds("a")
        cache.register(ref)  # the first request: a miss, its adapter loads from disk
        assert cache.stats()["adapter_hits"] == 0
        _until_ready(cache, "a")
        assert cache.holds("a")
        for _ in range(2):  # later requests find it in host memory
            cache.register(ref)
        assert cache.stats()["adapter_hits"] == 2
        cache.forget("a")
        assert not cache.holds("a")
        cache.register(ref)  # forgotten: loaded again, not a hit
        assert cache.stats()["adapter_hits"] == 2
        _until_ready(cache, "a")
        assert cache.stats()["adapter_loads"] == 2
    finally:
        cache.close()


def test_a_missing_file_fails_its_requests_and_the_next_one_loads_again(tmp_path: Path) -> None:
    cache = _cache_with_an_adapter_file(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()  # a cluster replica's cache evicted the copy before the engine read it
    ref = AdapterRef("a", str(tmp_path))
    try:
        cache.register(ref)
        assert _until_settled(cache, "a") is AdapterState.FAILED
        assert "could not be loaded" in (cache.failure("a") or "")
        weights.write_bytes(kept)  # fetched again
        cache.register(ref)  # the next request tries the files again
        _until_ready(cache, "a")
        # A broken file stays failed: it will not mend itself.
        (tmp_path / "adapter_config.json").write_text("{")
        cache.forget("a")
        cache.register(ref)
        assert _until_settled(cache, "a") is AdapterState.FAILED
        cache.register(ref)
        assert cache.state("a") is AdapterState.FAILED
    finally:
        cache.close()


def _until_settled(cache: AdapterCache, key: str) -> AdapterState:
    while (state := cache.state(key)) is AdapterState.LOADING:
        cache._loader.submit(lambda: None).result()  # the load, queued before this, is done after it
    return state


def _until_ready(cache: AdapterCache, key: str) -> None:
    assert _until_settled(cache, key) is AdapterState.READY

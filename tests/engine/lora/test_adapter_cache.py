"""The adapter cache's loader thread and the process's torch thread count."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from loraserve.catalog import RANDOM_SHAPES
from loraserve.engine.config import EngineConfig, ModelConfig
from loraserve.engine.lora.cache import AdapterCache
from loraserve.engine.lora.gemm import GemmLora


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

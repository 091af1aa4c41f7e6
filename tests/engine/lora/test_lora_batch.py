"""LoraBatch's three paths (padded bmm, heavy slots, sparse single slots) against a per-row loop."""

import random

import pytest
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.lora.batch import LoraBatch
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.pool import LoraGroup, LoraPool

CFG = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def pool() -> LoraPool:
    torch.manual_seed(0)
    p = LoraPool(CFG, 8, 20, torch.float32, torch.device("cpu"), GemmLora())
    for g in LoraGroup:
        p.a[g].normal_()
        p.b[g].normal_()
    return p


def _check(pool: LoraPool, slots: list[int | None]) -> LoraBatch | None:
    batch = LoraBatch.build([None if s is None else (pool, s) for s in slots], torch.device("cpu"))
    for g in LoraGroup:
        x = torch.randn(len(slots), pool.a[g].shape[2])
        out = torch.randn(len(slots), pool.b[g].shape[3])
        expected = out.clone()
        for i, s in enumerate(slots):
            if s is not None:
                expected[i] += x[i] @ pool.a[g][0, s] @ pool.b[g][0, s]
        if batch is not None:
            batch.apply(0, g, x, out)
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-4)
    return batch


def test_paths_chosen_by_shape(pool: LoraPool) -> None:
    decode = _check(pool, [2, None, 0, 3, 2, 1, None, 0])
    assert decode is not None and decode.parts[0].padded is not None and not decode.parts[0].heavy
    prefill = _check(pool, [5] * 60 + [6, 7, None, 7, 8])
    assert prefill is not None and prefill.parts[0].heavy and prefill.parts[0].padded is not None
    sparse = _check(pool, [0, 19, None])
    assert sparse is not None and sparse.parts[0].singles and sparse.parts[0].padded is None
    assert _check(pool, [None, None]) is None
    # A single stream, or two light slots: a GEMM pair each takes fewer ops than a padded block.
    for slots in ([3], [None, 3], [3, 3, 5]):
        few = _check(pool, slots)
        assert few is not None and few.parts[0].singles and few.parts[0].padded is None
    # A prefill chunk of several prompts: every slot with more than 32 rows runs its own GEMMs, never a
    # padded block (slots 1..4 x 100 rows for 160 real ones here, before the absolute limit).
    chunk = _check(pool, [1] * 100 + [2] * 30 + [4] * 30 + [3] * 30)
    assert chunk is not None and [s for s, _, _ in chunk.parts[0].heavy] == [1]
    assert chunk.parts[0].m == 30


def test_random_batches_match_a_per_row_loop(pool: LoraPool) -> None:
    rng = random.Random(0)
    for _ in range(100):
        n = rng.randint(1, 50)
        slots = [None if rng.random() < 0.2 else int(rng.paretovariate(1.0)) % 20 for _ in range(n)]
        _check(pool, slots)

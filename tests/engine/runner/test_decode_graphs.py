"""The static decode step that CUDA graphs replay, run eagerly here: padded rows, the KV scratch slot,
LoRA through per-row gathers with each pool's zero slot. Its logits must equal the eager step's (which
the LoRA tests check against PEFT). Capture and replay themselves need a GPU: tests/engine/test_cuda.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.pool import LoraPool
from loraserve.engine.runner.decode_graphs import (
    CTX_QUANTUM,
    MAX_GRAPH_RANK,
    batch_sizes,
    context_bucket,
    graphable,
)
from loraserve.types import AdapterRef, SamplingParams

from engine_helpers import (
    ALL_TARGETS,
    QV_TARGETS,
    build_engine,
    hf_model,
    make_adapter,
    wait_adapters_in_host,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_batch_sizes() -> None:
    assert batch_sizes(1) == [1]
    assert batch_sizes(5) == [1, 2, 4, 5]
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_context_bucket() -> None:
    assert [context_bucket(c) for c in (1, CTX_QUANTUM, CTX_QUANTUM + 1, 1000, 1024, 1025)] == \
        [CTX_QUANTUM, CTX_QUANTUM, 2 * CTX_QUANTUM, 1024, 1024, 2048]


def test_large_rank_buckets_run_eagerly(base: Any) -> None:
    cfg = build_engine(base).cfg
    small, large = (LoraPool(cfg, r, 1, torch.float32, torch.device("cpu"), GemmLora())
                    for r in (MAX_GRAPH_RANK, 2 * MAX_GRAPH_RANK))
    assert graphable([]) and graphable([small])
    assert not graphable([small, large])


@pytest.fixture(scope="module")
def base() -> Any:
    return hf_model(seed=5)


@pytest.fixture(scope="module")
def adapters(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    # Ranks 4 and 8 share the rank-8 pool; rank 16 has its own: a step uses two pools.
    specs = {"r4": dict(r=4, targets=QV_TARGETS), "r8": dict(r=8, targets=ALL_TARGETS),
             "r16": dict(r=16, targets=ALL_TARGETS)}
    return {name: AdapterRef(name, str(make_adapter(base, Path(root) / name, seed=i, **spec)))
            for i, (name, spec) in enumerate(specs.items())}


def _decoding_engine(base: Any, adapters: dict[str, AdapterRef], names: list[str | None]) -> LLMEngine:
    # The torch layout of adapter slots: a static batch gathers it (CUDA never packs for the CPU kernel).
    engine = build_engine(base, max_num_seqs=8, native_kernels=False)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"s{i}", torch.randint(3, 256, (5 + 3 * i,), generator=g).tolist(), params,
                               adapters[n] if n else None) for i, n in enumerate(names)]
    wait_adapters_in_host(engine, {adapters[n].key for n in names if n})
    while any(s.num_output == 0 for s in seqs):
        engine.step()
    return engine


@pytest.mark.parametrize("names", [["r8", None, "r16", "r4", "r8"], [None, None, None], ["r16"]])
def test_static_step_matches_the_eager_step(base: Any, adapters: dict[str, AdapterRef],
                                            names: list[str | None]) -> None:
    engine = _decoding_engine(base, adapters, names)
    runner = engine.runner
    for _ in range(3):
        sched = engine.scheduler.schedule().scheduled
        assert len(sched) == len(names) and all(s.num_new == 1 and s.samples for s in sched)
        meta, order = runner.prepare(sched)
        eager = engine.model.forward(meta, engine.kv)
        inputs = runner.decode_inputs(order, 8, context_bucket(max(s.seq.num_computed + 1 for s in order)),
                                      runner.adapter_slots(order))
        assert len(inputs.pools) == len({engine.adapters.slot(n)[0] for n in names if n})
        # Real rows write where the eager step writes; padding rows touch only the scratch and zero slots.
        assert inputs.slot_mapping[:len(names)].equal(meta.slot_mapping)
        assert inputs.slot_mapping[len(names):].eq(engine.kv.scratch_slot).all()
        for pool, idx in zip(inputs.pools, inputs.lora_slots, strict=True):
            assert idx[len(names):].eq(pool.zero_slot).all()
        static = engine.model.forward(inputs.to_meta(engine.device), engine.kv)
        assert static.shape[0] == 8
        torch.testing.assert_close(static[:len(names)], eager, atol=1e-5, rtol=1e-5)
        for s, row in zip(order, eager, strict=True):
            s.seq.num_computed += 1
            s.seq.append(int(row.argmax()))
    for s in list(engine.scheduler.running):
        engine.abort(s.request_id)
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0


def test_zero_slots_stay_zero_while_adapters_come_and_go(base: Any, adapters: dict[str, AdapterRef]) -> None:
    engine = build_engine(base, max_loras=1)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for name in ("r8", "r4", "r16", "r8"):
        engine.generate([[5, 6, 7]], params, [adapters[name]])
    pools = [pool for pool, _ in engine.adapters._pools.values()]
    assert len(pools) == 2
    for pool in pools:
        for tensors in (pool.a, pool.b):
            for t in tensors:
                assert t[:, pool.zero_slot].eq(0).all()

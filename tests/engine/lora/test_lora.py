"""Multi-LoRA serving against PEFT: mixed batches of adapters with different ranks, targets and scales.

The oracle is PEFT itself: adapters are saved with `save_pretrained` and loaded back with
`PeftModel.from_pretrained` on a copy of the same tiny transformers Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from loraserve.engine.config import EngineConfig
from loraserve.engine.core.sequence import Sequence
from loraserve.engine.llm_engine import LLMEngine, resolve_lora_dtype
from loraserve.engine.lora import pool as lora
from loraserve.engine.lora.adapter_file import load_adapter
from loraserve.engine.lora.batch import LoraBatch
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.pool import LoraGroup, LoraPool, rank_bucket
from loraserve.types import AdapterRef, FinishReason, SamplingParams

from engine_helpers import (
    ADAPTER_SPECS,
    ALL_TARGETS,
    QV_TARGETS,
    assert_trace_matches,
    build_engine,
    hf_logits,
    hf_model,
    make_adapter,
    make_adapters,
    model_config,
    peft_reference,
    random_prompts,
    reference_greedy,
    reference_logits,
    run_traced,
    wait_adapters_in_host,
)

# peft asks transformers for `is_gradient_checkpointing`, which transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SPECS = ADAPTER_SPECS
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def base() -> Any:
    return hf_model(seed=11)


@pytest.fixture(scope="module")
def adapters(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapters(base, root, list(SPECS))


@pytest.fixture(scope="module")
def reference(base: Any, adapters: dict[str, Path]) -> Any:
    return peft_reference(base, adapters)


def _refs(adapters: dict[str, Path]) -> dict[str, AdapterRef]:
    return {name: AdapterRef(name, str(path)) for name, path in adapters.items()}


def _run(engine: LLMEngine, requests: list[tuple[list[int], AdapterRef | None]],
         params: SamplingParams = GREEDY) -> list[Sequence]:
    seqs = [engine.add_request(f"q{i}", p, params, a) for i, (p, a) in enumerate(requests)]
    while engine.has_work():
        engine.step()
    return seqs


def test_rank_bucket() -> None:
    assert [rank_bucket(r) for r in (1, 2, 7, 8, 9, 16, 17, 32, 33, 64, 65, 256)] == \
        [8, 8, 8, 8, 16, 16, 32, 32, 64, 64, 128, 256]


def test_adapters_change_the_reference(base: Any, reference: Any) -> None:
    """Sanity for every other test here: each adapter moves PEFT's logits well beyond the tolerance."""
    ids = random_prompts([12])[0]
    plain = hf_logits(base, ids)
    for name in SPECS:
        assert (reference_logits(base, reference, ids, name) - plain).abs().max() > 0.05, name


def test_load_adapter_folds_the_peft_scale(base: Any, adapters: dict[str, Path]) -> None:
    cfg = model_config(base)
    from safetensors.torch import load_file

    for name, expected_scale in (("r8-all", 16 / 8), ("r16-all-rslora", 8 / 16 ** 0.5), ("r1-qv", 2.0)):
        w = load_adapter(AdapterRef(name, str(adapters[name])), cfg, torch.float32)
        raw = load_file(str(adapters[name] / "adapter_model.safetensors"))
        a = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
        b = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
        got_a, got_b = w.modules[(1, "q_proj")]
        torch.testing.assert_close(got_a, a)
        torch.testing.assert_close(got_b * w.scales[(1, "q_proj")], b * expected_scale)
        assert w.rank == SPECS[name]["r"]
    w = load_adapter(AdapterRef("p", str(adapters["r4-patterns"])), cfg, torch.float32)
    assert w.modules[(0, "v_proj")][0].shape == (2, 64)  # rank_pattern
    raw = load_file(str(adapters["r4-patterns"] / "adapter_model.safetensors"))
    b = raw["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    torch.testing.assert_close(w.modules[(0, "down_proj")][1], b)
    assert w.scales[(0, "down_proj")] == 24 / 4  # alpha_pattern
    assert set(w.modules) == {(layer, t) for layer in range(2) for t in ALL_TARGETS}


def test_load_adapter_refuses_weights_that_overflow_once_scaled(base: Any, adapters: dict[str, Path],
                                                               tmp_path: Path) -> None:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "loud"
    shutil.copytree(adapters["r1-qv"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 65504}))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v * 100 if "lora_B" in k else v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    ref = AdapterRef("loud", str(folder))
    assert load_adapter(ref, model_config(base), torch.float32).rank == 1  # finite in fp32
    with pytest.raises(ValueError, match=r"overflow torch\.float16"):
        load_adapter(ref, model_config(base), torch.float16)


@pytest.mark.parametrize(("native", "lora_dtype", "atol"), [
    (True, "auto", 2e-4), (False, "auto", 2e-4),
    # fp16 slots: each adapter weight rounded (relative 2^-11 at most); these adapters are strong (std up
    # to 0.2, scales up to 6): logits moved by up to 1.9e-3 here (the float32 kernel: 6e-6)
    (True, "float16", 5e-3),
], ids=["kernel", "torch", "kernel-float16"])
def test_mixed_batch_logits_match_peft_on_every_lora_path(base: Any, adapters: dict[str, Path],
                                                          reference: Any, native: bool, lora_dtype: str,
                                                          atol: float) -> None:
    refs = _refs(adapters)
    engine = build_engine(base, max_num_batched_tokens=128, native_kernels=native, lora_dtype=lora_dtype)
    # torch: the long first prompt on slot 0 next to short ones on slots 1..3 of the same rank-8 pool
    # makes slot 0 a heavy slot (its own GEMMs) in the first step; decode steps are padded bmm. The CPU
    # kernel takes every row of every pool (ranks 8, 16, 64 here).
    names: list[str | None] = ["r1-qv", "r2-mlp", None, "r8-all", "r4-patterns", "r16-all-rslora", "r64-attn",
                               "r8-all", None]
    prompts = random_prompts([90, 5, 9, 3, 6, 14, 7, 1, 4], seed=1)
    seqs = [engine.add_request(f"m{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                               refs[n] if n else None)
            for i, (p, n) in enumerate(zip(prompts, names, strict=True))]
    wait_adapters_in_host(engine, {refs[n].key for n in names if n})
    trace = run_traced(engine)
    if native:
        assert trace.lora_paths == {"sgmv"}
    else:
        assert {"heavy", "padded"} <= trace.lora_paths
    for seq, name in zip(seqs, names, strict=True):
        assert_trace_matches(trace, seq, reference_logits(base, reference, seq.token_ids, name), atol=atol)
    assert engine.blocks.num_used == 0
    assert engine.stats()["adapters_pinned"] == 0


def test_mixed_batch_greedy_tokens_match_peft(base: Any, adapters: dict[str, Path], reference: Any) -> None:
    refs = _refs(adapters)
    # A small token budget: prompts are chunked, and chunks of LoRA rows share steps with decodes.
    engine = build_engine(base, max_num_batched_tokens=16)
    names: list[str | None] = [None, "r64-attn", "r1-qv", "r16-all-rslora", None, "r2-mlp", "r8-all",
                               "r4-patterns", "r1-qv"]
    prompts = random_prompts([20, 3, 11, 7, 1, 25, 4, 9, 2], seed=2)
    seqs = _run(engine, [(p, refs[n] if n else None) for p, n in zip(prompts, names, strict=True)])
    for seq, name in zip(seqs, names, strict=True):
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name, 10), name


def test_float16_slots_need_the_cpu_kernel(base: Any) -> None:
    with pytest.raises(ValueError, match="lora_dtype float16 needs the CPU LoRA kernel"):
        build_engine(base, native_kernels=False, lora_dtype="float16")
    with pytest.raises(ValueError, match="lora_dtype"):
        build_engine(base, lora_dtype="bfloat16")
    engine = build_engine(base, lora_dtype="float16")
    assert engine.adapters.dtype is torch.float16


@pytest.mark.parametrize(("dtype", "lora_dtype", "kernel", "slots"), [
    ("gguf", "auto", True, torch.float16),  # beside quantized weights: half the bytes a step streams
    ("gguf", "auto", False, torch.float32),  # torch's LoRA path reads the model's dtype only
    ("gguf", "float32", True, torch.float32),  # kept for adapters past fp16's range
    ("float32", "auto", True, torch.float32),  # float32 weights: exact PEFT parity by default
    ("float32", "float16", True, torch.float16),
])
def test_slot_dtype(dtype: str, lora_dtype: str, kernel: bool, slots: torch.dtype) -> None:
    ecfg = EngineConfig(dtype=dtype, lora_dtype=lora_dtype)
    assert resolve_lora_dtype(ecfg, torch.float32, kernel) is slots


def test_more_adapters_than_slots(base: Any, adapters: dict[str, Path], reference: Any) -> None:
    """Two slots per rank bucket for four rank-8-bucket adapters: requests wait for a slot, evicted
    adapters are written back later (into slots that held other adapters), and every output is right."""
    refs = _refs(adapters)
    engine = build_engine(base, max_num_batched_tokens=32, max_loras=2, max_num_seqs=8)
    names = ["r8-all", "r1-qv", "r2-mlp", "r4-patterns", "r1-qv", "r8-all", "r2-mlp", "r4-patterns",
             "r16-all-rslora"]
    prompts = random_prompts([6, 8, 5, 12, 3, 7, 9, 4, 10], seed=3)
    seqs = _run(engine, [(p, refs[n]) for p, n in zip(prompts, names, strict=True)])
    stats = engine.stats()
    assert stats["adapters_device"] == 3  # two in the rank-8 pool, one in the rank-16 pool
    assert stats["adapters_pinned"] == 0
    for seq, name in zip(seqs, names, strict=True):
        assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name, 10), name


def test_one_slot_reused_by_adapters_with_other_targets(base: Any, adapters: dict[str, Path],
                                                        reference: Any) -> None:
    """A slot that held an all-targets adapter, reused by a q/v-only one: nothing of the first may remain."""
    refs = _refs(adapters)
    engine = build_engine(base, max_loras=1)
    prompt = random_prompts([7], seed=4)[0]
    for name in ("r8-all", "r1-qv", "r2-mlp", "r8-all"):
        (seq,) = _run(engine, [(prompt, refs[name])])
        assert seq.output_ids == reference_greedy(base, reference, prompt, name, 10), name
    assert engine.stats()["adapters_device"] == 1


def test_preemption_with_adapters(base: Any, adapters: dict[str, Path], reference: Any) -> None:
    """A KV cache for one context window (plus a block): sequences are preempted, their adapter pins
    released, and recomputed later; outputs still equal PEFT's."""
    refs = _refs(adapters)
    engine = build_engine(base, context_window=40, kv_cache_bytes=1, max_num_batched_tokens=32)
    assert engine.blocks.num_blocks == 11
    names = ["r8-all", None, "r16-all-rslora", "r1-qv", "r64-attn"]
    prompts = random_prompts([12, 10, 14, 9, 11], seed=5)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    seqs = _run(engine, [(p, refs[n] if n else None) for p, n in zip(prompts, names, strict=True)], params)
    assert sum(s.num_preemptions for s in seqs) > 0
    for seq, name in zip(seqs, names, strict=True):
        assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name, 20), name
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0


def test_broken_adapters_fail_only_their_own_requests(base: Any, adapters: dict[str, Path], reference: Any,
                                                      tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    shutil.copytree(adapters["r8-all"], garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    # An adapter for some other model: hidden size 96 instead of 64.
    other = make_adapter(hf_model(seed=1, hidden_size=96), tmp_path / "other", seed=2, r=4,
                         targets=QV_TARGETS)
    refs = _refs(adapters)
    bad = {
        "garbage": AdapterRef("garbage", str(garbage)),
        "other-model": AdapterRef("other-model", str(other)),
        "missing": AdapterRef("missing", str(tmp_path / "does-not-exist")),
    }
    engine = build_engine(base, max_num_batched_tokens=32)
    plan: list[tuple[str | None, AdapterRef | None]] = [
        ("r8-all", refs["r8-all"]), ("garbage", bad["garbage"]), (None, None),
        ("other-model", bad["other-model"]), ("r1-qv", refs["r1-qv"]), ("missing", bad["missing"]),
        ("garbage", bad["garbage"]),
    ]
    prompts = random_prompts([5, 6, 7, 8, 9, 4, 3], seed=6)
    seqs = _run(engine, [(p, ref) for p, (_, ref) in zip(prompts, plan, strict=True)])
    for seq, (name, _) in zip(seqs, plan, strict=True):
        if name in bad:
            assert seq.finish_reason is FinishReason.ERROR and seq.output_ids == [], name
            assert engine.adapters.failure(name)
        else:
            assert seq.finish_reason is FinishReason.LENGTH
            assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name, 10), name
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0
    # The engine keeps serving the good adapters afterwards.
    (again,) = _run(engine, [(prompts[0], refs["r8-all"])])
    assert again.output_ids == seqs[0].output_ids


def test_layer_specific_alpha_pattern_matches_peft(base: Any, tmp_path: Path) -> None:
    """PEFT matches rank/alpha patterns against the module's full name (model.layers.1.self_attn.q_proj),
    so a pattern for one layer's projection must scale that projection only."""
    path = make_adapter(base, tmp_path / "layer-pattern", seed=7, r=4, targets=ALL_TARGETS, lora_alpha=4,
                        alpha_pattern={"model.layers.1.self_attn.q_proj": 64, "mlp.down_proj": 12})
    assert json.loads((path / "adapter_config.json").read_text())["alpha_pattern"]
    reference: Any = peft_reference(base, {"lp": path})
    layers = reference.base_model.model.model.layers
    assert (layers[1].self_attn.q_proj.scaling["lp"] == 16.0
            and layers[0].self_attn.q_proj.scaling["lp"] == 1.0)
    assert layers[0].mlp.down_proj.scaling["lp"] == 3.0

    w = load_adapter(AdapterRef("lp", str(path)), model_config(base), torch.float32)
    scales = {}
    for key in ((1, "q_proj"), (0, "q_proj"), (0, "down_proj")):
        layer, target = key
        module = layers[layer].self_attn if target == "q_proj" else layers[layer].mlp
        peft_b = getattr(module, target).lora_B["lp"].weight
        scales[key] = float((w.modules[key][1] * w.scales[key] / peft_b).mean())
    assert scales == pytest.approx({(1, "q_proj"): 16.0, (0, "q_proj"): 1.0, (0, "down_proj"): 3.0})

    engine = build_engine(base)
    prompt = random_prompts([6], seed=8)[0]
    (seq,) = _run(engine, [(prompt, AdapterRef("lp", str(path)))])
    assert seq.output_ids == reference_greedy(base, reference, prompt, "lp", 10)


# -- LoraBatch on its own: both shrink/expand paths against a per-row loop ----------------------------

def _pool_with_adapters(base: Any, adapters: dict[str, Path], names: list[str],
                        bucket: int) -> tuple[LoraPool, list[Any]]:
    cfg = model_config(base)
    pool = LoraPool(cfg, bucket, len(names), torch.float32, torch.device("cpu"), GemmLora())
    weights = []
    for slot, name in enumerate(names):
        w = load_adapter(AdapterRef(name, str(adapters[name])), cfg, torch.float32)
        pool.write(slot, w)
        weights.append(w)
    return pool, weights


def _naive_delta(w: Any, layer: int, group: LoraGroup, x: torch.Tensor, cfg: Any) -> torch.Tensor:
    shapes = cfg.lora_shapes()
    parts = []
    for target in lora.GROUP_TARGETS[group]:
        pair = w.modules.get((layer, target))
        if pair is None:
            parts.append(torch.zeros(shapes[target][1]))
        else:
            a, b = pair
            parts.append(b @ (a @ x) * w.scales[(layer, target)])
    return torch.cat(parts)


@pytest.mark.parametrize("pattern", ["decode", "long-prefill"])
def test_lora_batch_paths_match_a_per_row_loop(base: Any, adapters: dict[str, Path], pattern: str) -> None:
    cfg = model_config(base)
    names = ["r1-qv", "r2-mlp", "r8-all", "r4-patterns"]
    pool, weights = _pool_with_adapters(base, adapters, names, bucket=8)
    if pattern == "decode":
        slots: list[int | None] = [2, None, 0, 3, 2, 1, None, 0]
    else:
        slots = [0] * 70 + [None] * 3 + [3] + [1] * 2 + [2]
    batch = LoraBatch.build([None if s is None else (pool, s) for s in slots], torch.device("cpu"))
    assert batch is not None and len(batch.parts) == 1
    assert batch.parts[0].padded is not None
    assert bool(batch.parts[0].heavy) == (pattern == "long-prefill")
    g = torch.Generator().manual_seed(0)
    for group in LoraGroup:
        fan_in = pool.a[group].shape[2]
        fan_out = pool.b[group].shape[3]
        for layer in range(cfg.num_layers):
            x = torch.randn(len(slots), fan_in, generator=g)
            out = torch.randn(len(slots), fan_out, generator=g)
            expected = out.clone()
            for row, s in enumerate(slots):
                if s is not None:
                    expected[row] += _naive_delta(weights[s], layer, group, x[row], cfg)
            batch.apply(layer, group, x, out)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lora_batch_of_rows_without_adapters_is_none() -> None:
    assert LoraBatch.build([None, None], torch.device("cpu")) is None


def test_adapters_over_the_engines_max_rank_fail_their_requests(base: Any, adapters: dict[str, Path]) -> None:
    refs = _refs(adapters)
    engine = build_engine(base, max_num_batched_tokens=32, max_lora_rank=8)
    prompts = random_prompts([5, 6], seed=3)
    over, within = _run(engine, [(prompts[0], refs["r16-all-rslora"]), (prompts[1], refs["r8-all"])])
    assert (over.finish_reason is FinishReason.ERROR
            and "max_lora_rank" in (engine.adapters.failure("r16-all-rslora") or ""))
    assert within.finish_reason is FinishReason.LENGTH


def test_prefix_cache_is_per_adapter(base: Any, adapters: dict[str, Path], reference: Any) -> None:
    """A cached prefix computed under one adapter (whose q/k/v deltas shape its K/V) serves later requests
    of that adapter only; every output still matches PEFT's."""
    refs = _refs(adapters)
    engine = build_engine(base)
    prefix = random_prompts([24], seed=7)[0]
    first = _run(engine, [([*prefix, 5, 6], refs["r8-all"])])
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    names: list[str | None] = ["r8-all", "r16-all-rslora", None, "r8-all"]
    later = _run(engine, [([*prefix, 7 + i], refs[n] if n else None) for i, n in enumerate(names)])
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * 24  # the two r8-all requests, six blocks of 4
    for seq, name in zip([*first, *later], ["r8-all", *names], strict=True):
        assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name,
                                                  GREEDY.max_tokens), name

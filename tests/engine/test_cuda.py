"""The engine on a CUDA device, against PEFT on the CPU: the same code as the CPU tests, on the GPU.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
`python -m pytest tests/engine/test_cuda.py`. fp32 on the GPU must match PEFT's fp32 logits as the CPU engine
does (a looser tolerance: cuBLAS sums in another order); bf16 and fp16, the GPU's serving dtypes, must
stay within their own rounding of PEFT's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loraserve.engine.llm_engine import LLMEngine
from loraserve.types import AdapterRef, FinishReason, SamplingParams

from engine_helpers import (
    assert_trace_matches,
    build_engine,
    hf_model,
    make_adapters,
    peft_reference,
    random_prompts,
    reference_greedy,
    reference_logits,
    run_traced,
    wait_adapters_in_host,
)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

NAMES: list[str | None] = ["r1-qv", "r2-mlp", None, "r8-all", "r16-all-rslora", "r64-attn", "r8-all", None]
LENGTHS = [90, 5, 9, 3, 14, 7, 1, 4]


@pytest.fixture(scope="module")
def base() -> Any:
    return hf_model(seed=11)


@pytest.fixture(scope="module")
def adapters(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    paths = make_adapters(base, root, ["r1-qv", "r2-mlp", "r8-all", "r16-all-rslora", "r64-attn"])
    return {name: AdapterRef(name, str(path)) for name, path in paths.items()}


@pytest.fixture(scope="module")
def reference(base: Any, adapters: dict[str, AdapterRef]) -> Any:
    return peft_reference(base, {name: Path(ref.path) for name, ref in adapters.items()})


def _cuda_engine(base: Any, dtype: str, **options: Any) -> LLMEngine:
    engine = build_engine(base, device="cuda", dtype=dtype, **options)
    assert engine.model.embed.device.type == "cuda" and engine.kv.k.device.type == "cuda"
    return engine


def _add(engine: LLMEngine, adapters: dict[str, AdapterRef], seed: int, max_tokens: int = 8) -> list[Any]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"c{i}", p, params, adapters[n] if n else None)
            for i, (p, n) in enumerate(zip(random_prompts(LENGTHS, seed), NAMES, strict=True))]
    wait_adapters_in_host(engine, {adapters[n].key for n in NAMES if n})
    return seqs


def test_fp32_mixed_batch_logits_match_peft(base: Any, adapters: dict[str, AdapterRef],
                                            reference: Any) -> None:
    engine = _cuda_engine(base, "float32", max_num_batched_tokens=128)
    seqs = _add(engine, adapters, seed=1)
    trace = run_traced(engine)
    assert {"heavy", "padded"} <= trace.lora_paths
    for seq, name in zip(seqs, NAMES, strict=True):
        ref = reference_logits(base, reference, seq.token_ids, name)
        assert_trace_matches(trace, seq, ref.to("cuda"), atol=1e-3, rtol=1e-3)
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_within_its_rounding(base: Any, adapters: dict[str, AdapterRef], reference: Any,
                                                  dtype: str) -> None:
    engine = _cuda_engine(base, dtype, max_num_batched_tokens=128)
    assert engine.dtype == getattr(torch, dtype)
    seqs = _add(engine, adapters, seed=2)
    trace = run_traced(engine)
    worst = 0.0
    for seq, name in zip(seqs, NAMES, strict=True):
        ref = reference_logits(base, reference, seq.token_ids, name)
        for pos, got in trace.rows[seq.seq_id]:
            # Relative L2 error of the whole logit row: bf16 keeps 8 mantissa bits (~0.4% per rounding).
            err = float((got.float().cpu() - ref[pos]).norm() / ref[pos].norm())
            worst = max(worst, err)
    assert worst < (0.03 if dtype == "bfloat16" else 0.005), worst


def test_greedy_tokens_match_peft_with_chunked_prefill_and_eviction(
        base: Any, adapters: dict[str, AdapterRef], reference: Any) -> None:
    # Few slots and a small token budget: adapters are evicted and copied back into device slots, prompts
    # are chunked and share steps with decodes.
    engine = _cuda_engine(base, "float32", max_num_batched_tokens=16, max_loras=2, max_num_seqs=8)
    prompts = random_prompts(LENGTHS, seed=3)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"g{i}", p, params, adapters[n] if n else None)
            for i, (p, n) in enumerate(zip(prompts, NAMES, strict=True))]
    while engine.has_work():
        engine.step()
    for seq, name in zip(seqs, NAMES, strict=True):
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name, 10), name
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0


def test_preemption_on_the_gpu(base: Any, adapters: dict[str, AdapterRef], reference: Any) -> None:
    engine = _cuda_engine(base, "float32", context_window=40, kv_cache_bytes=1, max_num_batched_tokens=32)
    names = ["r8-all", None, "r16-all-rslora", "r1-qv", "r64-attn"]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"p{i}", p, params, adapters[n] if n else None)
            for i, (p, n) in enumerate(zip(random_prompts([12, 10, 14, 9, 11], seed=5), names, strict=True))]
    while engine.has_work():
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    for seq, name in zip(seqs, names, strict=True):
        assert seq.output_ids == reference_greedy(base, reference, seq.prompt_ids, name, 20), name


def test_seeded_sampling_on_the_gpu(base: Any, adapters: dict[str, AdapterRef]) -> None:
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = random_prompts([6], seed=7)[0]
    alone = _cuda_engine(base, "float32").generate([prompt], p, [adapters["r8-all"]])[0]
    engine = _cuda_engine(base, "float32")
    others = [SamplingParams(max_tokens=n, temperature=0.8, ignore_eos=True) for n in (5, 30)]
    batch = engine.generate([random_prompts([9], 8)[0], prompt, random_prompts([4], 9)[0]],
                            [others[0], p, others[1]], [adapters["r1-qv"], adapters["r8-all"], None])
    assert batch[1] == alone
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    assert alone != engine.generate([prompt], greedy, [adapters["r8-all"]])[0]


def test_cuda_graphs_replay_what_the_eager_engine_computes(base: Any, adapters: dict[str, AdapterRef],
                                                            reference: Any) -> None:
    prompts = random_prompts(LENGTHS, seed=10)
    refs = [adapters[n] if n else None for n in NAMES]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    graphed = _cuda_engine(base, "float32")
    eager = _cuda_engine(base, "float32", cuda_graphs=False)
    out = graphed.generate(prompts, params, refs)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.num_graphs > 0
    assert eager.runner.graphs is None
    assert out == eager.generate(prompts, params, refs)
    for ids, prompt, name in zip(out, prompts, NAMES, strict=True):
        assert ids == reference_greedy(base, reference, prompt, name, 12), name
    assert graphed.blocks.num_used == 0 and graphed.stats()["adapters_pinned"] == 0

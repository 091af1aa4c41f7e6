"""Every served family's decoder on a CUDA device, against transformers + PEFT on the CPU: what
test_cuda.py checks for Llama, for the families whose options (GeGLU, embedding scale, sandwich norms,
soft-capped scores and logits, sliding windows, query_pre_attn_scalar, q/k norms, q/k/v biases) only
tests/engine/models/test_family.py checked, on the CPU.

Skipped where torch sees no CUDA device; on a GPU machine:
`python -m pytest tests/engine/test_cuda_families.py`. The models are hf_family_helpers' (windows of
`WINDOW` tokens, shorter than the prompts here, so a sliding layer that read its whole context would fail).
Gemma 3's and Mistral 3's multimodal wrappers serve their text model, which `gemma3_text` and `mistral`
already are here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.models.family import family_of
from loraserve.types import AdapterRef, FinishReason, SamplingParams

from engine_helpers import (
    assert_trace_matches,
    build_engine,
    make_adapters,
    peft_reference,
    random_prompts,
    reference_greedy,
    reference_logits,
    run_traced,
    wait_adapters_in_host,
)
from hf_family_helpers import WINDOW, assert_means_the_same, random_model

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

DEVICE = "cuda"
FAMILIES = ["gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "mistral"]
ADAPTERS = ["r1-qv", "r2-mlp", "r8-all", "r16-all-rslora", "r64-attn"]
NAMES: list[str | None] = ["r8-all", None, "r1-qv", "r16-all-rslora", "r2-mlp", None, "r64-attn", "r8-all"]
# Most prompts pass the window; hf_family_helpers' models have 128 positions, prompt and output together.
LENGTHS = [31, 5, 9, 3, 14, 7, 1, 22]


@dataclass
class FamilyCase:
    name: str
    hf: Any  # the transformers model, on the CPU
    cfg: ModelConfig
    adapters: dict[str, AdapterRef]
    reference: Any  # PeftModel holding every adapter


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FamilyCase:
    name: str = request.param
    hf = random_model(name, seed=FAMILIES.index(name) + 3)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert_means_the_same(cfg, hf)  # the engine is told what transformers computes
    assert family_of(cfg.architecture) is family_of(hf.config.model_type)
    if name in ("gemma2", "gemma3_text", "qwen2", "mistral"):
        assert cfg.sliding_window == WINDOW < max(LENGTHS)
        assert any(cfg.is_sliding(i) for i in range(cfg.num_layers))
    paths = make_adapters(hf, tmp_path_factory.mktemp(name), ADAPTERS)
    return FamilyCase(name, hf, cfg, {n: AdapterRef(n, str(p)) for n, p in paths.items()},
                  peft_reference(hf, paths))


def _engine(fam: FamilyCase, dtype: str = "float32", **options: Any) -> LLMEngine:
    engine = build_engine(fam.hf, cfg=fam.cfg, device=DEVICE, dtype=dtype, **options)
    # The embedding of a tied head lives in the head: the norms and the cache say where the model is.
    assert engine.model.norm.device.type == DEVICE and engine.kv.k.device.type == DEVICE
    assert engine.model.family is family_of(fam.hf.config.model_type)
    return engine


def _add(engine: LLMEngine, fam: FamilyCase, seed: int, max_tokens: int) -> list[Any]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"c{i}", p, params, fam.adapters[n] if n else None)
            for i, (p, n) in enumerate(zip(random_prompts(LENGTHS, seed), NAMES, strict=True))]
    wait_adapters_in_host(engine, {fam.adapters[n].key for n in NAMES if n})
    return seqs


def test_fp32_mixed_batch_logits_match_peft(fam: FamilyCase) -> None:
    """Chunked prefill sharing steps with decodes, rows of five adapters and none: every row's logits."""
    engine = _engine(fam, max_num_batched_tokens=16)
    seqs = _add(engine, fam, seed=1, max_tokens=6)
    trace = run_traced(engine)
    assert trace.mixed_steps > 0 and trace.max_step_tokens <= 16
    for seq, name in zip(seqs, NAMES, strict=True):
        ref = reference_logits(fam.hf, fam.reference, seq.token_ids, name)
        assert_trace_matches(trace, seq, ref.to(DEVICE), atol=1e-3, rtol=1e-3)
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_within_its_rounding(fam: FamilyCase, dtype: str) -> None:
    """Relative L2 error of each logit row against PEFT's fp32 logits, bounded by what transformers + PEFT
    themselves lose in that dtype (up to 0.03 in bf16 here: Gemma's soft-caps and four norms a layer
    round more than Llama's two, so test_cuda.py's fixed bounds would not fit every family)."""
    engine = _engine(fam, dtype, max_num_batched_tokens=16)
    assert engine.dtype == getattr(torch, dtype)
    seqs = _add(engine, fam, seed=2, max_tokens=6)
    trace = run_traced(engine)
    hf_half, peft_half = (copy.deepcopy(m).to(getattr(torch, dtype)) for m in (fam.hf, fam.reference))
    ours = theirs = 0.0
    for seq, name in zip(seqs, NAMES, strict=True):
        ref = reference_logits(fam.hf, fam.reference, seq.token_ids, name)
        half = reference_logits(hf_half, peft_half, seq.token_ids, name)
        for pos, got in trace.rows[seq.seq_id]:
            ours = max(ours, float((got.float().cpu() - ref[pos]).norm() / ref[pos].norm()))
            theirs = max(theirs, float((half[pos] - ref[pos]).norm() / ref[pos].norm()))
    assert ours < 2 * theirs, (ours, theirs)


def test_greedy_tokens_past_the_window_match_peft(fam: FamilyCase) -> None:
    """Generation runs on well past the window (CUDA graphs replaying the decodes), with prompts chunked
    and two device slots for five adapters (evicted and copied back)."""
    engine = _engine(fam, max_num_batched_tokens=16, max_loras=2, max_num_seqs=8)
    seqs = _add(engine, fam, seed=3, max_tokens=16)
    while engine.has_work():
        engine.step()
    for seq, name in zip(seqs, NAMES, strict=True):
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_ids == reference_greedy(fam.hf, fam.reference, seq.prompt_ids, name, 16), name
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0


def test_cuda_graphs_replay_what_the_eager_engine_computes(fam: FamilyCase) -> None:
    prompts = random_prompts(LENGTHS, seed=10)
    refs = [fam.adapters[n] if n else None for n in NAMES]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    graphed = _engine(fam)
    eager = _engine(fam, cuda_graphs=False)
    out = graphed.generate(prompts, params, refs)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.num_graphs > 0
    assert eager.runner.graphs is None
    assert out == eager.generate(prompts, params, refs)
    for ids, prompt, name in zip(out, prompts, NAMES, strict=True):
        assert ids == reference_greedy(fam.hf, fam.reference, prompt, name, 12), name
    assert graphed.blocks.num_used == 0 and graphed.stats()["adapters_pinned"] == 0


def test_graph_logits_match_peft(fam: FamilyCase) -> None:
    """The logits replayed graphs compute (not only their argmax), decode rows of every adapter and none
    padded to the graph's batch, each against PEFT's."""
    engine = _engine(fam)
    seqs = _add(engine, fam, seed=4, max_tokens=8)
    runner = engine.runner
    assert runner.graphs is not None
    while any(s.num_output == 0 for s in seqs):  # every prompt prefilled, eagerly
        engine.step()
    assert runner.graphs.num_graphs == 0
    for _ in range(4):
        sched = engine.scheduler.schedule().scheduled
        assert len(sched) == len(NAMES) and all(s.num_new == 1 and s.samples for s in sched)
        logits, rows = runner._forward(sched)  # what `step` runs: a graph for a pure decode step
        assert runner.graphs.num_graphs == 1
        for r in rows.sampling:
            assert r.sample_row is not None
            ref = reference_logits(fam.hf, fam.reference, r.seq.token_ids, NAMES[seqs.index(r.seq)])
            torch.testing.assert_close(logits[r.sample_row].cpu(), ref[-1], atol=1e-3, rtol=1e-3)
        for r in rows.sampling:
            assert r.sample_row is not None
            r.seq.num_computed += 1
            r.seq.append(int(logits[r.sample_row].argmax()))
    for s in list(engine.scheduler.running):
        engine.abort(s.request_id)
    assert engine.blocks.num_used == 0 and engine.stats()["adapters_pinned"] == 0

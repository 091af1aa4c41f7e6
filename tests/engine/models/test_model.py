"""Our Llama forward over the paged KV cache against transformers' LlamaForCausalLM, logit for logit.

Each case runs several prompts through the real scheduler (chunked prefill, batched decode, mixed
steps) and compares the logits of every computed row with transformers' logits at that position.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.models.rope import rope_tables
from loraserve.engine.ops.linear import PackedLinear
from loraserve.types import SamplingParams

from engine_helpers import (
    assert_trace_matches,
    build_engine,
    hf_greedy,
    hf_logits,
    hf_model,
    legacy_hf_dict,
    run_traced,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES: dict[str, dict[str, Any]] = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "llama3-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                        max_position_embeddings=256, rope_theta=500000.0),
    "head-dim-override": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6),
}


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _check_logits(case: str, cfg_from: str) -> None:
    hf = hf_model(seed=3, **CASES[case])
    cfg = ModelConfig.from_hf(legacy_hf_dict(hf) if cfg_from == "legacy" else hf.config.to_dict())
    # A small token budget: long prompts are cut into chunks, later steps mix decodes with chunks.
    engine = build_engine(hf, cfg=cfg, max_num_batched_tokens=24)
    lengths = [90, 7, 33, 1] if case == "llama3-rope" else [40, 7, 19, 1]
    prompts = _prompts(hf.config.vocab_size, lengths)
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    trace = run_traced(engine)
    assert trace.mixed_steps > 0 and trace.max_step_tokens <= 24
    for seq in seqs:
        assert seq.num_output == 12
        assert_trace_matches(trace, seq, hf_logits(hf, seq.token_ids))
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str) -> None:
    """ModelConfig from the config dict transformers 5 writes (`rope_parameters`)."""
    _check_logits(case, "transformers5")


@pytest.mark.parametrize("case", ["gqa-untied", "llama3-rope"])
def test_logits_match_transformers_hub_style_config(case: str) -> None:
    """ModelConfig from a transformers 4 / Hub style config.json (top-level rope_theta, rope_scaling)."""
    _check_logits(case, "legacy")


def test_from_hf_reads_transformers5_rope_parameters() -> None:
    """transformers >= 5 saves RoPE settings only under `rope_parameters` (no top-level rope_theta or
    rope_scaling): a config.json written by `save_pretrained` today must keep its theta and scaling."""
    hf = hf_model(seed=0, **CASES["llama3-rope"])
    d = hf.config.to_dict()
    assert "rope_theta" not in d and d["rope_parameters"]["rope_theta"] == 500000.0
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling["factor"] == 8.0


def test_llama3_rope_reaches_scaled_positions() -> None:
    """The llama3 case is only meaningful if its tables differ from plain RoPE past the original window."""
    hf = hf_model(seed=3, **CASES["llama3-rope"])
    cfg = ModelConfig.from_hf(legacy_hf_dict(hf))
    plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
    cos_scaled, _ = rope_tables(cfg, torch.device("cpu"))
    cos_plain, _ = rope_tables(plain, torch.device("cpu"))
    assert not torch.allclose(cos_scaled[100], cos_plain[100], atol=1e-3)
    # And they agree with transformers' own rotary embedding.
    rotary = hf.model.rotary_emb
    pos = torch.arange(cfg.max_position_embeddings).unsqueeze(0)
    cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = rope_tables(cfg, torch.device("cpu"))
    torch.testing.assert_close(cos, cos_hf[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, sin_hf[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers_generate() -> None:
    hf = hf_model(seed=5)
    engine = build_engine(hf, max_num_batched_tokens=16)
    prompts = _prompts(hf.config.vocab_size, [11, 3, 25], seed=7)
    outs = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == hf_greedy(hf, prompt, 20)


def test_cpu_weights_with_the_linear_kernel_are_kept_once() -> None:
    """With the C kernels every weight is kept once, packed (linear.py); tokens match HF's."""
    hf = hf_model(seed=5, tie_word_embeddings=True)
    engine = build_engine(hf, max_num_batched_tokens=16)
    model = engine.model
    for proj in [p for lw in model.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [model.lm_head]:
        assert isinstance(proj, PackedLinear)
    assert model.embed is None  # tied: the embedding rows are read from the head's panels
    prompts = _prompts(hf.config.vocab_size, [11, 3, 25], seed=7)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("dual_budget", [1 << 30, 0])
def test_cpu_weight_layouts_within_their_budget(dual_budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C kernels: q/k/v and o as [in, out] only, down as [out, in], gate/up and lm_head in
    both layouts while the second copies fit the budget (linear.py); the tokens never depend on it."""
    monkeypatch.setattr("loraserve.engine.ops.linear.DUAL_LAYOUT_MAX_BYTES", dual_budget)
    hf = hf_model(seed=5, tie_word_embeddings=True)
    engine = build_engine(hf, max_num_batched_tokens=16, native_kernels=False)
    for lw in engine.model.layers:
        assert lw.qkv.w is None and lw.qkv.wt is not None and lw.o.w is None
        assert lw.down.wt is None and lw.down.w is not None
        assert (lw.gate_up.wt is not None) == bool(dual_budget) and lw.gate_up.w is not None
    head = engine.model.lm_head
    # Tied: one copy, in the head.
    assert engine.model.embed is None and (head.wt is not None) == bool(dual_budget)
    prompts = _prompts(hf.config.vocab_size, [11, 3, 25], seed=7)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == hf_greedy(hf, prompt, 12)


def test_prefill_of_a_single_token_prompt_and_decode_share_a_step() -> None:
    """A one-token prompt is scheduled like a decode row (num_new == 1) but has no cached context."""
    hf = hf_model(seed=9)
    engine = build_engine(hf)
    a = engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.step()  # a's prompt is in the cache; a now decodes
    b = engine.add_request("b", [42], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    trace = run_traced(engine)
    assert_trace_matches(trace, a, hf_logits(hf, a.token_ids), first=5)
    assert_trace_matches(trace, b, hf_logits(hf, b.token_ids))
    assert b.output_ids[:5] == hf_greedy(hf, [42], 5)


def test_model_config_round_trip() -> None:
    hf = hf_model(seed=0, **CASES["llama3-rope"])
    cfg = ModelConfig.from_hf(legacy_hf_dict(hf))
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 16 and cfg.rope_scaling is not None
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.lora_shapes()["k_proj"] == (64, 32)
    assert cfg.lora_shapes()["down_proj"] == (128, 64)


def test_model_config_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3,
                    num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=0, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=4)

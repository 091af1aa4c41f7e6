"""The decoder's family seam: Gemma's and Qwen2's layers, described as `Family` entries, against
transformers' own models, logit for logit, through the real scheduler (chunked prefill, batched decode),
on the C kernels and on torch's operators."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loraserve.engine.config import ModelConfig
from loraserve.engine.models.family import family_of
from loraserve.types import SamplingParams

from engine_helpers import assert_trace_matches, build_engine, hf_logits, run_traced

SHAPE: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.1, bos_token_id=1, eos_token_id=2)


def _random(model: Any) -> Any:
    model.eval()
    with torch.no_grad():  # random norms (Gemma's are offsets from 1) and biases, so each one matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def gemma() -> Any:
    torch.manual_seed(7)  # head_dim independent of hidden / heads, tied head, GeGLU (tanh GELU)
    return _random(GemmaForCausalLM(GemmaConfig(head_dim=24, **SHAPE)))


def qwen2() -> Any:
    torch.manual_seed(8)  # q/k/v biases, untied head
    return _random(Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, rope_theta=1e6, **SHAPE)))


@pytest.mark.parametrize("make", [gemma, qwen2])
@pytest.mark.parametrize("native_kernels", [True, False], ids=["kernels", "torch"])
def test_family_logits_match_transformers(make: Any, native_kernels: bool) -> None:
    hf = make()
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert cfg.architecture == hf.config.model_type
    engine = build_engine(hf, cfg=cfg, max_num_batched_tokens=24, native_kernels=native_kernels)
    assert engine.model.family is family_of(hf.config.model_type)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 7, 19)]
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    trace = run_traced(engine)
    assert trace.mixed_steps > 0
    for seq in seqs:
        assert seq.num_output == 8
        assert_trace_matches(trace, seq, hf_logits(hf, seq.token_ids))


def test_an_unknown_family_is_refused_with_the_served_ones() -> None:
    with pytest.raises(ValueError, match=r"'gpt2' is not served by this engine; served: llama, mistral"):
        family_of("gpt2")

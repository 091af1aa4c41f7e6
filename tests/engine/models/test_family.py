"""The decoder's family seam: every family's layers, described as `Family` entries, against transformers'
own models and PEFT adapters, logit for logit, through the real scheduler (chunked prefill, batched decode,
mixed-adapter batches with adapter-free rows, prompts past the sliding window), on the C kernels and on
torch's operators."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from loraserve.engine.config import ModelConfig
from loraserve.engine.lora.adapter_file import AdapterRef
from loraserve.engine.models.family import family_of
from loraserve.types import SamplingParams

from engine_helpers import (
    ALL_TARGETS,
    QV_TARGETS,
    assert_trace_matches,
    build_engine,
    hf_logits,
    make_adapter,
    peft_reference,
    reference_greedy,
    reference_logits,
    run_traced,
    wait_adapters_in_host,
)

# peft asks transformers for `is_gradient_checkpointing`, which transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SHAPE: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.1, bos_token_id=1, eos_token_id=2)
WINDOW = 12  # shorter than the long prompts below, so sliding layers drop positions a full layer reads


def _random(model: Any) -> Any:
    model.eval()
    with torch.no_grad():  # random norms (Gemma's are offsets from 1) and biases, so each one matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def gemma() -> Any:  # head_dim independent of hidden / heads, tied head, GeGLU (tanh GELU)
    return _random(GemmaForCausalLM(GemmaConfig(head_dim=24, **SHAPE)))


def gemma2() -> Any:  # sandwich norms, soft-capped scores and logits, alternating sliding layers
    return _random(Gemma2ForCausalLM(Gemma2Config(
        head_dim=24, query_pre_attn_scalar=32, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        sliding_window=WINDOW, attn_implementation="eager", **SHAPE)))


def gemma3() -> Any:  # + q/k norms, local (10k) and global (scaled, 1M) RoPE, its own sliding pattern
    return _random(Gemma3ForCausalLM(Gemma3TextConfig(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        attn_implementation="eager", **SHAPE)))


def qwen2() -> Any:  # q/k/v biases, untied head
    return _random(Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, rope_theta=1e6, **SHAPE)))


def qwen3() -> Any:  # q/k norms, no biases, head_dim of its own
    return _random(Qwen3ForCausalLM(Qwen3Config(head_dim=24, tie_word_embeddings=False, **SHAPE)))


def mistral() -> Any:  # Mistral v0.1's window on every layer
    return _random(MistralForCausalLM(MistralConfig(sliding_window=WINDOW, attn_implementation="eager",
                                                    **SHAPE)))


FAMILIES: list[Callable[[], Any]] = [gemma, gemma2, gemma3, qwen2, qwen3, mistral]


def _model(make: Callable[[], Any]) -> Any:
    torch.manual_seed(FAMILIES.index(make) + 7)
    return make()


@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("native_kernels", [True, False], ids=["kernels", "torch"])
def test_family_logits_match_transformers_and_peft(make: Callable[[], Any], native_kernels: bool,
                                                   tmp_path: Path) -> None:
    hf = _model(make)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    assert family_of(cfg.architecture) is family_of(hf.config.model_type)
    adapters = {"all": make_adapter(hf, tmp_path / "all", seed=1, r=8, targets=ALL_TARGETS, lora_alpha=16,
                                    std=0.1),
                "qv": make_adapter(hf, tmp_path / "qv", seed=2, r=4, targets=QV_TARGETS, std=0.2)}
    reference = peft_reference(hf, adapters)
    refs = {name: AdapterRef(name, str(path)) for name, path in adapters.items()}
    engine = build_engine(hf, cfg=cfg, max_num_batched_tokens=24, native_kernels=native_kernels)
    assert engine.model.family is family_of(hf.config.model_type)
    g = torch.Generator().manual_seed(1)
    names: list[str | None] = ["all", None, "qv", "all", None]
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 30, 7, 19, 3)]
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                               refs[n] if n else None)
            for i, (p, n) in enumerate(zip(prompts, names, strict=True))]
    wait_adapters_in_host(engine, {r.key for r in refs.values()})
    trace = run_traced(engine)
    assert trace.mixed_steps > 0
    for seq, name in zip(seqs, names, strict=True):
        assert seq.num_output == 8
        assert_trace_matches(trace, seq, reference_logits(hf, reference, seq.token_ids, name))


@pytest.mark.parametrize("make", [gemma2, gemma3])
def test_greedy_tokens_past_the_window_match_transformers_generate(make: Callable[[], Any]) -> None:
    """Generation runs on from the cache well past the window: what each sliding layer still sees moves
    with every token, and the result equals transformers' own generate."""
    hf = _model(make)
    engine = build_engine(hf, cfg=ModelConfig.from_hf(hf.config.to_dict()), max_num_batched_tokens=16)
    prompt = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = engine.add_request("g", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert seq.output_ids == reference_greedy(hf, None, prompt, None, 24)


def test_windows_and_soft_caps_change_the_result() -> None:
    """Sanity for the tests above: each option this seam carries moves transformers' own logits, so a
    backend that ignored one would fail them."""
    hf = _model(gemma2)
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    base = hf_logits(hf, ids)
    for change in ({"sliding_window": 1000}, {"attn_logit_softcapping": None},
                   {"final_logit_softcapping": None}):
        other = Gemma2ForCausalLM(Gemma2Config(**{**hf.config.to_dict(), **change})).eval()
        other.load_state_dict(hf.state_dict())
        assert (hf_logits(other, ids) - base).abs().max() > 1e-2, change


def test_an_unknown_family_is_refused_with_the_served_ones() -> None:
    with pytest.raises(ValueError, match=r"'gpt2' is not served by this engine; served: llama, mistral"):
        family_of("gpt2")

"""Model families: what a decoder layer does, described as data the decoder reads, not as a copy of it.

Every family here is a pre-norm decoder over a paged KV cache with fused q/k/v and gate/up projections;
what differs between families is a handful of choices, each a field below. Adding a family is adding an
entry (and, where it needs an attention option no backend has yet, that option in `ops/`).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.engine.ops.glue import Activation
from loraserve.peft import canonical_model_type


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's / adapter_config.json's
    activation: Activation = Activation.SILU  # of the gated MLP: act(gate) * up
    # RMSNorm multiplies by (offset + w): Gemma's (1 + w) is folded into w once, at load.
    norm_offset: float = 0.0
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) before the first layer (Gemma)
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2); never LoRA targets
    # Attention and MLP outputs normed before their residual add too (Gemma 2/3): four norms a layer,
    # HF's input_layernorm, post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm.
    sandwich_norms: bool = False
    # q and k RMS-normed per head before RoPE (Gemma 3, Qwen3): self_attn.q_norm / k_norm, [head_dim].
    qk_norm: bool = False


LLAMA = Family("llama")
MISTRAL = Family("mistral")
GEMMA = Family("gemma", activation=Activation.GELU_TANH, norm_offset=1.0, embed_scale=True)
GEMMA2 = Family("gemma2", activation=Activation.GELU_TANH, norm_offset=1.0, embed_scale=True,
                sandwich_norms=True)
GEMMA3 = Family("gemma3_text", activation=Activation.GELU_TANH, norm_offset=1.0,
                embed_scale=True, sandwich_norms=True, qk_norm=True)
QWEN2 = Family("qwen2", qkv_bias=True)
QWEN3 = Family("qwen3", qk_norm=True)
FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, GEMMA, GEMMA2, GEMMA3, QWEN2, QWEN3)}


def family_of(model_type: str) -> Family:
    """The family of a `model_type`; ValueError for one the engine does not serve."""
    # A multimodal wrapper's model_type (Gemma 3's "gemma3", Mistral 3's "mistral3") names its text model's.
    family = FAMILIES.get(canonical_model_type(model_type))
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not served by this engine; "
                         f"served: {', '.join(FAMILIES)}")
    return family

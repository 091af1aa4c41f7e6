"""Model families: what a decoder layer does, described as data the decoder reads, not as a copy of it.

Every family here is a pre-norm decoder over a paged KV cache with fused q/k/v and gate/up projections;
what differs between families is a handful of choices, each a field below. Adding a family is adding an
entry (and, where it needs an attention option no backend has yet, that option in `ops/`).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.engine.ops.glue import Activation


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's / adapter_config.json's
    activation: Activation = Activation.SILU  # of the gated MLP: act(gate) * up
    # RMSNorm multiplies by (offset + w): Gemma's (1 + w) is folded into w once, at load.
    norm_offset: float = 0.0
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) before the first layer (Gemma)
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2); never LoRA targets


LLAMA = Family("llama")
# Gemma (1) and Qwen2 decoders are computed here (tests/engine/models/test_family.py: logits against
# transformers); loading their checkpoints, templates and catalog ids are issue 17's.
GEMMA = Family("gemma", activation=Activation.GELU_TANH, norm_offset=1.0, embed_scale=True)
QWEN2 = Family("qwen2", qkv_bias=True)
FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, Family("mistral"), GEMMA, QWEN2)}


def family_of(model_type: str) -> Family:
    """The family of a `model_type`; ValueError for one the engine does not serve."""
    family = FAMILIES.get(model_type.lower())
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not served by this engine; "
                         f"served: {', '.join(FAMILIES)}")
    return family

"""Tiny random transformers models of every served family (and the multimodal wrappers served as their text
model), and the check that a ModelConfig means what transformers' own modules do.

The oracle reads the instantiated transformers modules (each attention layer's scale, window and
soft-cap, the rotary embedding's tables, the MLP's activation), never a config key, so it carries
transformers' own reading of defaults, legacy keys and layer patterns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import (
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    Mistral3Config,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.activations import ACT2FN

from loraserve.engine.config import ModelConfig
from loraserve.engine.models.family import family_of
from loraserve.engine.models.rope import rope_tables
from loraserve.engine.ops.attention import LayerAttention
from loraserve.engine.ops.glue import Activation

SHAPE: dict[str, Any] = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             initializer_range=0.1)
WINDOW = 6  # shorter than the test prompts: sliding layers drop positions a full layer reads
EAGER = dict(attn_implementation="eager")  # soft-capping and windows as transformers computes them itself
GEMMA3_TEXT: dict[str, Any] = dict(
    head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW, attn_logit_softcapping=4.0,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}},
    **SHAPE)
SIGLIP = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
PIXTRAL = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)

CONFIGS: dict[str, Callable[[], Any]] = {
    # head_dim independent of hidden / heads, tied head, GeGLU (tanh GELU)
    "gemma": lambda: GemmaConfig(head_dim=24, **SHAPE),
    # sandwich norms, soft-capped scores and logits, alternating sliding layers, query_pre_attn_scalar
    "gemma2": lambda: Gemma2Config(head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
                                   attn_logit_softcapping=4.0, final_logit_softcapping=3.0, **EAGER, **SHAPE),
    # + q/k norms, local and (linearly scaled) global RoPE bases
    "gemma3_text": lambda: Gemma3TextConfig(**GEMMA3_TEXT, **EAGER),
    "gemma3": lambda: Gemma3Config(text_config=Gemma3TextConfig(**GEMMA3_TEXT), vision_config=SIGLIP,
                                   mm_tokens_per_image=4, image_token_index=250, boi_token_index=251,
                                   eoi_token_index=252, **EAGER),
    # q/k/v biases, untied head, the window on the layers from max_window_layers on
    "qwen2": lambda: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2,
                                 rope_theta=1e6, **EAGER, **SHAPE),
    "qwen3": lambda: Qwen3Config(head_dim=24, tie_word_embeddings=True, **SHAPE),  # q/k norms, tied
    "mistral": lambda: MistralConfig(sliding_window=WINDOW, **EAGER, **SHAPE),  # v0.1: every layer slides
    # Mistral-Small-3.1's kind: no window, a head of its own
    "mistral3": lambda: Mistral3Config(
        text_config=MistralConfig(sliding_window=None, head_dim=24, **SHAPE), vision_config=PIXTRAL,
        image_token_index=250, tie_word_embeddings=False),
}


_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                  "mistral3": "Mistral3ForConditionalGeneration"}


def random_model(name: str, seed: int = 0) -> Any:
    """The family's transformers model, eval mode, with random norms (Gemma's are offsets from 1) and
    biases, so that each one matters."""
    torch.manual_seed(seed)
    model: Any = getattr(transformers, _ARCHITECTURES[name])(CONFIGS[name]())
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            elif key.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


def text_model(model: Any) -> Any:
    """The decoder stack (embedding, layers, final norm) of a causal LM or of a multimodal wrapper."""
    inner = model.model
    return getattr(inner, "language_model", inner)


def text_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The text model's tensors under the causal LM's names (the wrapper's towers left out), the head only
    when it is not the embedding."""
    out = {"model." + k: v for k, v in text_model(model).state_dict().items()}
    head, embed = model.lm_head.weight, text_model(model).embed_tokens.weight
    if head.data_ptr() != embed.data_ptr():
        out["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach() for k, v in out.items() if not k.endswith("rotary_emb.inv_freq")}


_ACTIVATION_NAMES = {Activation.SILU: "silu", Activation.GELU_TANH: "gelu_pytorch_tanh"}


def assert_means_the_same(cfg: ModelConfig, model: Any) -> None:
    """`cfg` describes the decoder `model`'s modules compute (shapes, per-layer attention, RoPE tables,
    activation, the family's extra tensors); `model` may live on the meta device."""
    text = text_model(model)
    tcfg = text.config
    family = family_of(cfg.architecture)
    assert family is family_of(tcfg.model_type)
    layer0, attn0 = text.layers[0], text.layers[0].self_attn
    assert (cfg.vocab_size, cfg.hidden_size) == tuple(text.embed_tokens.weight.shape)
    assert cfg.num_layers == len(text.layers) and cfg.head_dim == attn0.head_dim
    assert (cfg.q_size, cfg.kv_size) == (attn0.q_proj.out_features, attn0.k_proj.out_features)
    assert cfg.intermediate_size == layer0.mlp.gate_proj.out_features
    assert cfg.rms_norm_eps == getattr(text.norm, "eps", getattr(text.norm, "variance_epsilon", None))
    assert cfg.max_position_embeddings == tcfg.max_position_embeddings
    assert type(layer0.mlp.act_fn) is type(ACT2FN[_ACTIVATION_NAMES[family.activation]])
    assert family.qkv_bias == (attn0.q_proj.bias is not None) and attn0.o_proj.bias is None
    assert family.qk_norm == hasattr(attn0, "q_norm")
    assert family.sandwich_norms == hasattr(layer0, "pre_feedforward_layernorm")
    assert cfg.final_logit_softcapping == getattr(tcfg, "final_logit_softcapping", None)
    for i, layer in enumerate(text.layers):
        attn = layer.self_attn
        # Mistral's layers read the config's window (every layer); the other families keep their own.
        mistral = tcfg.model_type == "mistral"
        window = getattr(attn, "sliding_window", tcfg.sliding_window if mistral else None)
        # Gemma 3's attention keeps a soft-cap it never passes on (transformers 5.24): Gemma 2's alone caps.
        softcap = attn.attn_logit_softcapping if tcfg.model_type == "gemma2" else None
        assert LayerAttention.of_layer(cfg, i) == LayerAttention(attn.scaling, softcap, window), i
    _assert_rope(cfg, text)


def _assert_rope(cfg: ModelConfig, text: Any) -> None:
    rotary = type(text.rotary_emb)(text.config)  # on the CPU, whatever device `text` is on
    # The first positions (transformers computes in float32, exact enough there): a config sets the
    # frequencies, and they show in every position.
    cfg = dataclasses.replace(cfg, max_position_embeddings=min(cfg.max_position_embeddings, 256))
    pos = torch.arange(cfg.max_position_embeddings).unsqueeze(0)
    x = torch.zeros(1, dtype=torch.float32)
    kinds = sorted(set(getattr(text.config, "layer_types", None) or ["full_attention"]))
    if getattr(rotary, "layer_types", None):  # one table per layer type (Gemma 3)
        theirs = {kind: rotary(x, pos, kind) for kind in rotary.layer_types}
    else:
        theirs = {kind: rotary(x, pos) for kind in kinds}
    for kind, (cos_hf, sin_hf) in theirs.items():
        cos, sin = rope_tables(cfg, torch.device("cpu"), local=kind == "sliding_attention")
        torch.testing.assert_close(cos, cos_hf[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(sin, sin_hf[0], atol=1e-4, rtol=0)

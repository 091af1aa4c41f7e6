"""llama.cpp's architectures this engine reads and writes, and how its converter stores each one's tensors.

`convert_hf_to_gguf.py` renames every tensor (`blk.N.attn_q.weight`), and for some architectures changes
the values too: for "llama" it reorders q/k rows for its RoPE, for the Gemma ones it stores RMSNorm weights
as (1 + w). Both directions are described here once, so that writing and reading undo each other exactly.
"""

from __future__ import annotations

import enum
import functools
import re

from loraserve.engine.models.family import MISTRAL, Family, family_of


class GGUFArch(enum.Enum):
    """`general.architecture` of the files this engine serves."""

    LLAMA = "llama"
    MISTRAL = "mistral"
    GEMMA = "gemma"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"

    @property
    def family(self) -> Family:
        return family_of(self.value)  # "gemma3" is an alias of the gemma3_text family

    @property
    def permutes_qk(self) -> bool:
        """llama.cpp runs these with its "normal" RoPE, which rotates dims (2j, 2j + 1) of a head where HF's
        rotate_half rotates (j, j + head_dim/2): the converter reorders q/k rows to match. The others run
        NEOX RoPE, which is rotate_half, and keep HF's rows."""
        return self in (GGUFArch.LLAMA, GGUFArch.MISTRAL)

    @classmethod
    def parse(cls, name: object) -> GGUFArch:
        try:
            return cls(name)
        except ValueError:
            served = ", ".join(a.value for a in cls)
            raise ValueError(f"GGUF architecture {name!r} is not supported (expected one of {served})"
                             ) from None

    @classmethod
    def of(cls, family: Family) -> GGUFArch:
        """The architecture llama.cpp's converter writes a family's checkpoint as: Mistral's is "llama"."""
        if family is MISTRAL:
            return cls.LLAMA
        arch = next((a for a in cls if a.family is family), None)
        if arch is None:
            raise ValueError(f"{family.model_type} models are not written to GGUF")
        return arch


_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@functools.cache
def _layer_names(family: Family) -> dict[str, str]:
    """llama.cpp's name of each tensor of a layer (after `blk.N.`) -> HF's (after `model.layers.N.`)."""
    names = {
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
        "attn_norm.weight": "input_layernorm.weight",
    }
    if family.sandwich_norms:
        # llama.cpp's ffn_norm is always the MLP's input norm: Gemma 2/3's pre_feedforward_layernorm, where
        # HF's post_attention_layernorm is the norm of the attention output.
        names |= {"post_attention_norm.weight": "post_attention_layernorm.weight",
                  "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                  "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
    else:
        names["ffn_norm.weight"] = "post_attention_layernorm.weight"
    if family.qk_norm:
        names |= {"attn_q_norm.weight": "self_attn.q_norm.weight",
                  "attn_k_norm.weight": "self_attn.k_norm.weight"}
    if family.qkv_bias:
        names |= {f"attn_{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
    return names


def hf_name(arch: GGUFArch, gguf_name: str) -> str | None:
    """The HF name of a tensor of the file, or None for one this architecture does not have."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    name = _layer_names(arch.family).get(m.group(2)) if m else None
    return None if m is None or name is None else f"model.layers.{m.group(1)}.{name}"


def gguf_name(arch: GGUFArch, hf: str) -> str:
    for gguf, name in _GLOBAL.items():
        if name == hf:
            return gguf
    m = _HF_LAYER.fullmatch(hf)
    if m:
        for gguf, name in _layer_names(arch.family).items():
            if name == m.group(2):
                return f"blk.{m.group(1)}.{gguf}"
    raise ValueError(f"no llama.cpp {arch.value} name for {hf}")


def norm_shift(arch: GGUFArch, hf: str) -> float:
    """What the converter adds to a tensor: Gemma's RMSNorm scales by (1 + w), llama.cpp's by w, so every
    Gemma norm weight (the q/k norms too) is stored as w + 1."""
    return arch.family.norm_offset if hf.endswith("norm.weight") else 0.0

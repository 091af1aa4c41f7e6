"""Weights, config and tokenizer from a llama.cpp GGUF file.

With `keep_quantized`, projection and embedding tensors of the block types the engine multiplies as
stored (`weights/quant.py`: Q8_0, Q4_0, Q4_1 and the K-quants of Q4_K_M / Q5_K_M files, Q4_K, Q5_K,
Q6_K) stay blocks, views of the memory-mapped file; every other quantized tensor is dequantized with
gguf-py. Float tensors of the requested dtype stay views of the mapped file.
llama.cpp's converter reorders some things for its own kernels, and this undoes them so the result is
what `transformers` would have loaded.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.hf import StateDict, check_complete
from loraserve.engine.weights.quant import QuantTensor, QuantType, drop_pages
from loraserve.engine.weights.tokenizer import Tokenizer, gguf_field

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp files Mistral 7B under "llama" too; both are this engine's decoder.
_ARCHITECTURES = ("llama", "mistral")
_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def load_gguf(path: str | Path, dtype: torch.dtype,
              keep_quantized: bool = False) -> tuple[ModelConfig, StateDict, Tokenizer]:
    # Copy-on-write mapping: arrays come out writable (torch warns on read-only memory) while the file
    # is never modified, and a page is only copied if someone writes to it.
    reader = gguf.GGUFReader(path, mode="c")
    if keep_quantized:
        _refuse_unsupported(reader, path)
    tokenizer = Tokenizer.from_gguf(reader)
    config = _config(reader, tokenizer)
    state: StateDict = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = _hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name} (not a Llama-family decoder?)")
        stored = _as_stored(tensor) if keep_quantized else None
        weight = _dequantize(tensor).to(dtype) if stored is None else stored
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if ".q_proj" in name else config.num_kv_heads
            weight = _unpermute_rope(weight, heads)
        state[name] = weight
    check_complete(state, config, path)
    return config, state, tokenizer


def release_pages(path: str | Path) -> None:
    """Drop this process's resident pages of the mapped file. Loading reads most of it (blocks repacked
    into the kernel's layout, tensors dequantized or reordered), and those pages would stay in the
    process's memory as long as anything maps the file (an untied embedding does), doubling a quantized
    model's footprint. The few still used come back from the page cache when touched; nothing is lost:
    the mapping is copy-on-write and nothing writes to it."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    real = os.path.realpath(path)
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            drop_pages(start, end - start)


def _refuse_unsupported(reader: gguf.GGUFReader, path: str | Path) -> None:
    """A tensor kept quantized must be of a type the kernel multiplies: anything else would be dequantized
    to float, which for a whole 7B file means ~27 GB where the user expected ~4. Refused up front, with
    the way out (`--dtype float32`) and whether it fits this machine."""
    floats = (*_FLOAT_TYPES, gguf.GGMLQuantizationType.BF16)
    kept = {int(q) for q in QuantType}
    bad = [t for t in reader.tensors if t.tensor_type not in floats and int(t.tensor_type) not in kept]
    if not bad:
        return
    float32_gb = sum(int(t.n_elements) for t in reader.tensors) * 4 / 1e9
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    fits = (f"which fits this machine's {memory_gb:.0f} GB" if float32_gb < 0.8 * memory_gb
            else f"more than this machine's {memory_gb:.0f} GB: pick a file of a supported type")
    types = sorted({t.tensor_type.name for t in bad})
    raise ValueError(
        f"{path}: tensor {bad[0].name} is {bad[0].tensor_type.name} ({len(bad)} tensors of type "
        f"{', '.join(types)}), which --dtype gguf does not multiply as stored; supported: "
        f"{', '.join(q.name for q in QuantType)} (and F32/F16/BF16). --dtype float32 dequantizes the file "
        f"instead: {float32_gb:.1f} GB of float32, {fits}")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    # GGUF lists dimensions fastest-first (ggml's ne); torch wants them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    kind = tensor.tensor_type
    if kind in _FLOAT_TYPES:
        return torch.from_numpy(tensor.data).reshape(shape)  # a view of the mapped file
    if kind == gguf.GGMLQuantizationType.BF16:
        # numpy has no bfloat16: the reader hands out the raw bytes, which torch can view as bf16.
        return torch.from_numpy(tensor.data).view(torch.bfloat16).reshape(shape)
    try:
        # As a plain ndarray: numpy's memmap subclass costs a Python call per row slice gguf-py takes.
        values = gguf.quants.dequantize(tensor.data.view(np.ndarray), kind)
    except NotImplementedError:
        raise ValueError(f"{tensor.name}: GGUF tensor type {kind.name} is not supported") from None
    return torch.from_numpy(values).reshape(shape)


def _as_stored(tensor: gguf.ReaderTensor) -> QuantTensor | None:
    """A 2-D tensor of a block type the engine multiplies as stored, as its blocks; else None."""
    try:
        qtype = QuantType(int(tensor.tensor_type))
    except ValueError:
        return None
    if len(tensor.shape) != 2:
        return None
    cols, rows = (int(d) for d in tensor.shape)  # ggml's ne: fastest first
    blocks = torch.from_numpy(tensor.data.view(np.ndarray)).reshape(rows, -1)  # a view of the mapped file
    return QuantTensor(blocks, qtype, rows, cols, mapped=True)


def _unpermute_rope(weight: torch.Tensor | QuantTensor, heads: int) -> torch.Tensor | QuantTensor:
    """Undo the converter's reordering of q/k rows: llama.cpp's RoPE rotates dims (2j, 2j+1) of a head,
    HF's rotate_half rotates (j, j + head_dim/2). Whole rows move, so blocks move as they are."""
    rows = weight.shape[0]
    if isinstance(weight, QuantTensor):
        # rows: [heads, head_dim/2, 2] (llama.cpp's order) -> [heads, 2, head_dim/2] (HF's)
        order = torch.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)
        return weight.permute_rows(order)
    cols = weight.shape[1]
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _config(reader: gguf.GGUFReader, tokenizer: Tokenizer) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (expected one of {_ARCHITECTURES})")

    def num(key: str, default: float | None = None) -> float:
        value = gguf_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata {arch}.{key} is missing")
        return float(value)

    hidden, heads = int(num("embedding_length")), int(num("attention.head_count"))
    head_dim = int(num("attention.key_length", hidden // heads))
    if int(num("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    scaling = gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    rope_theta = num("rope.freq_base", 10000.0)
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(num("vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens")))),
        hidden_size=hidden,
        intermediate_size=int(num("feed_forward_length")),
        num_layers=int(num("block_count")),
        num_heads=heads,
        num_kv_heads=int(num("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=num("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=None if freqs is None else _llama3_scaling(np.asarray(freqs.data), rope_theta, head_dim),
        max_position_embeddings=int(num("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
        architecture=str(arch),
    )


def _llama3_factors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Per-dimension divisors of the RoPE frequencies, as llama.cpp's converter computes them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama 3.1+ GGUFs carry their "llama3" RoPE scaling as a `rope_freqs` tensor of per-dimension
    factors, not as parameters. Recover HF's parameters: the released models all use one of a few
    settings, and a candidate is only taken if it reproduces every factor."""
    if np.allclose(factors, 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for low, high, old in itertools.product((1.0, 2.0), (4.0, 8.0), (8192, 4096, 16384, 32768)):
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": old}
        if np.allclose(_llama3_factors(inv_freq, scaling), factors, rtol=1e-4):
            return scaling
    raise ValueError("rope_freqs in this GGUF matches no llama3 RoPE scaling this engine knows")

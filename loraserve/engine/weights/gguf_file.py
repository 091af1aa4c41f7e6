"""Weights, config and tokenizer from a llama.cpp GGUF file.

With `keep_quantized`, projection and embedding tensors of the block types the engine multiplies as
stored (`weights/quant.py`: Q8_0, Q4_0, Q4_1 and the K-quants of Q4_K_M / Q5_K_M files, Q4_K, Q5_K,
Q6_K) stay blocks, views of the memory-mapped file; every other quantized tensor is dequantized with
gguf-py. Float tensors of the requested dtype stay views of the mapped file.
llama.cpp's converter renames tensors and changes some for its own kernels (`gguf_arch.py`: "llama" q/k
rows reordered, Gemma norms stored as 1 + w), and this undoes it so the result is what `transformers`
would have loaded; the config is what llama.cpp derives from the metadata (`gguf_hparams.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from loraserve.engine.config import ModelConfig, physical_memory
from loraserve.engine.weights.gguf_arch import GGUFArch, hf_name, norm_shift
from loraserve.engine.weights.gguf_hparams import ROPE_FREQS, config_from_gguf
from loraserve.engine.weights.gguf_meta import GGUFFile, gguf_field
from loraserve.engine.weights.hf import StateDict, check_complete
from loraserve.engine.weights.quant import QuantTensor, QuantType, drop_pages
from loraserve.engine.weights.tokenizer import Tokenizer

_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def load_gguf(path: str | Path, dtype: torch.dtype,
              keep_quantized: bool = False) -> tuple[ModelConfig, StateDict, Tokenizer]:
    # Copy-on-write mapping: arrays come out writable (torch warns on read-only memory) while the file
    # is never modified, and a page is only copied if someone writes to it.
    reader = GGUFFile(path, mode="c")
    if keep_quantized:
        _refuse_unsupported(reader, path)
    arch = GGUFArch.parse(gguf_field(reader, "general.architecture"))
    tokenizer = Tokenizer.from_gguf(reader)
    config = config_from_gguf(reader, arch, tokenizer)
    state: StateDict = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_name(arch, tensor.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {tensor.name} (not a {arch.value} decoder?)")
        stored = _as_stored(tensor) if keep_quantized else None
        if stored is not None:
            weight: torch.Tensor | QuantTensor = stored
        else:
            weight = _dequantize(tensor)
            if shift := norm_shift(arch, name):
                weight = weight.float() - shift  # in float32: the stored 1 + w has w's precision, no more
            weight = weight.to(dtype)
        if arch.permutes_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
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
    memory_gb = physical_memory() / 1e9
    fits = (f"which fits this machine's {memory_gb:.0f} GB" if float32_gb < 0.8 * memory_gb
            else f"more than this machine's {memory_gb:.0f} GB: pick a file of a supported type")
    types = sorted({t.tensor_type.name for t in bad})
    raise ValueError(
        f"{path}: tensor {bad[0].name} is {bad[0].tensor_type.name} ({len(bad)} tensors of type "
        f"{', '.join(types)}), which --dtype gguf does not multiply as stored; supported: "
        f"{', '.join(q.name for q in QuantType)} (and F32/F16/BF16). --dtype float32 dequantizes the file "
        f"instead: {float32_gb:.1f} GB of float32, {fits}")


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

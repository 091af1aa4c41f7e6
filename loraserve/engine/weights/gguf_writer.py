"""GGUF files llama.cpp reads: a model's hyperparameters, tokenizer and tensors, streamed.

`write_gguf` takes the tensors in HF names and HF row order, as the engine keeps them, and writes them the
way llama.cpp's `convert_hf_to_gguf.py` does for the model's architecture (`gguf_arch.py`): its tensor
names, q/k rows permuted for the RoPE of "llama", Gemma's norms as 1 + w, norms and biases F32; and the
hyperparameters its loader reads (`gguf_hparams.py`). `gguf_file.py` undoes exactly that on reading.
The header is written from the planned shapes and types, then each tensor is made, written and dropped
in turn, so a 4 GB file never exists twice in memory. It goes to OUT.partial and is renamed when
complete: a failure leaves no half file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.models.family import family_of
from loraserve.engine.weights.gguf_arch import GGUFArch, gguf_name, norm_shift
from loraserve.engine.weights.gguf_hparams import add_hyperparameters
from loraserve.engine.weights.gguf_vocab import add_tokenizer
from loraserve.engine.weights.quant import QuantTensor, QuantType, Weight
from loraserve.engine.weights.quantize import progress


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its HF name, torch shape and stored type (None: F32), and `make()`, which
    returns it (blocks of that type, or a float tensor) when its turn to be written comes."""

    name: str
    shape: tuple[int, ...]
    qtype: QuantType | None
    make: Callable[[], Weight]

    @property
    def nbytes(self) -> int:
        if self.qtype is None:
            return int(np.prod(self.shape)) * 4
        rows, cols = self.shape
        return rows * (cols // self.qtype.block_elems) * self.qtype.block_bytes


def write_gguf(path: Path, config: ModelConfig, tokenizer_source: Path, tensors: Sequence[PlannedTensor],
               overwrite: bool = False, name: str | None = None,
               file_type: gguf.LlamaFileType | None = None) -> None:
    """Write `tensors` (every tensor `hf.expected_shapes(config)` names) to `path`. `tokenizer_source` is a
    Hugging Face directory (tokenizer.json) or a GGUF file whose tokenizer metadata is copied. `file_type`
    (general.file_type, informational: llama.cpp prints it) is named after the tensors' types if not given
    and if they have one."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (--force replaces it)")
    arch = GGUFArch.of(family_of(config.architecture))
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch.value)
    try:
        _add_general(writer, tensors, name or path.stem, file_type)
        add_hyperparameters(writer, arch, config)
        add_tokenizer(writer, tokenizer_source, config.vocab_size)
        for t in tensors:
            if t.qtype is None:
                writer.add_tensor_info(gguf_name(arch, t.name), t.shape, np.dtype(np.float32), t.nbytes)
            else:
                rows, cols = t.shape
                byte_shape = (rows, cols // t.qtype.block_elems * t.qtype.block_bytes)
                writer.add_tensor_info(gguf_name(arch, t.name), byte_shape, np.dtype(np.uint8), t.nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType(t.qtype.value))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress(sum(t.nbytes for t in tensors), f"writing {path.name}") as advance:
            for t in tensors:
                writer.write_tensor_data(_stored(t, arch, config))
                advance(t.name, t.nbytes)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def _add_general(writer: gguf.GGUFWriter, tensors: Sequence[PlannedTensor], name: str,
                 file_type: gguf.LlamaFileType | None) -> None:
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if file_type is not None:
        writer.add_file_type(int(file_type))
        return
    kinds = {t.qtype for t in tensors if t.qtype is not None and t.name != "lm_head.weight"}
    if len(kinds) == 1:  # llama.cpp names the file's type after its projections' (informational)
        kind = kinds.pop().name
        # a K-quant alone throughout is llama.cpp's "small" mix of it (Q4_K_S); Q6_K has one name
        file_type = gguf.LlamaFileType.__members__.get(f"MOSTLY_{kind}") \
            or gguf.LlamaFileType.__members__.get(f"MOSTLY_{kind}_S")
        if file_type is not None:
            writer.add_file_type(int(file_type))


def _stored(t: PlannedTensor, arch: GGUFArch, config: ModelConfig) -> np.ndarray:
    """The tensor as the file holds it: blocks or float32, q/k rows in llama.cpp's order, norms shifted."""
    weight = t.make()
    if tuple(weight.shape) != t.shape:
        raise ValueError(f"{t.name}: made with shape {tuple(weight.shape)}, planned {t.shape}")
    if isinstance(weight, QuantTensor) and weight.qtype is t.qtype:
        data: np.ndarray = weight.blocks.numpy()
    elif isinstance(weight, torch.Tensor) and t.qtype is None:
        data = weight.detach().to(torch.float32).contiguous().numpy()
        if shift := norm_shift(arch, t.name):
            data = data + np.float32(shift)
    else:
        raise ValueError(f"{t.name}: made as {type(weight).__name__}, planned {t.qtype or 'F32'}")
    if arch.permutes_qk and t.name.endswith("self_attn.q_proj.weight"):
        return llama_cpp_permute(data, config.num_heads)
    if arch.permutes_qk and t.name.endswith("self_attn.k_proj.weight"):
        return llama_cpp_permute(data, config.num_kv_heads)
    return data


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's reordering of q/k rows: within a head, HF's rotate_half pairs (j, j + d/2),
    llama.cpp's RoPE pairs (2j, 2j + 1). Whole rows move, so it applies to blocks as they are."""
    n = rows.shape[0]
    return np.ascontiguousarray(rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2)
                                .reshape(rows.shape))

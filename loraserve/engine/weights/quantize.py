"""Float weights to GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K blocks, as ggml's reference quantizer writes
them.

The arithmetic is gguf-py's `gguf.quants.quantize` (ggml's reference, `quantize_row_*_ref`, in numpy; the
tests hold it to a literal transcription of the C), and for the K-quants, which gguf-py cannot make, the
kernel library's C (csrc/quantize_k.h: Q4_K, Q5_K, ggml's fitted scales and mins; csrc/quantize_q6k.h: Q6_K,
ggml's fitted scales; numpy would take many minutes for a 7B): a weight goes through it a chunk of rows at
a time, so the float32 copy that exists is a chunk's, never a whole tensor's (a bf16 checkpoint is read as
stored and widened chunk by chunk), and the chunks run on a few threads (numpy and ctypes release the GIL).

Which type each tensor gets (`target_type`) is llama.cpp's choice for the same file type (llama-quant.cpp,
checked against llama.cpp's own quantizer in tests/engine/weights/test_gguf_writer.py): the projections and
embedding in the chosen type, the head (an untied one, else the embedding, which is the head) in Q6_K for
the 4- and 5-bit types, `q4_k` llama.cpp's Q4_K_S (v of the first 4 layers and down of the first eighth in
Q5_K), and `q4_k_m` / `q5_k_m` llama.cpp's Q4_K_M / Q5_K_M mixes (Q4_K / Q5_K, v and down in Q6_K in the
layers of `quant.use_more_bits`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from loraserve.engine.config import ModelConfig, Quantization
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.weights.hf import StateDict, checkpoint_files, hf_tensors, load_hf_dir
from loraserve.engine.weights.quant import QuantTensor, QuantType, Weight, k_m_type, q4_k_s_type

MADE = (QuantType.Q8_0, QuantType.Q4_0, QuantType.Q4_1, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K)
# Rows per chunk: ~4 MB of float32, so that numpy's dozen passes over it mostly stay in cache.
_CHUNK_FLOATS = 1 << 20
_WORKERS = min(8, os.cpu_count() or 1)
# The head (untied, or the tied embedding) is where a 4-bit model loses most: llama.cpp gives it Q6_K for
# every 4- and 5-bit file type (Q4_0, Q4_1, Q4_K_S, Q4_K_M, Q5_K_M), 6.56 bits a weight, Q8_0 for Q8_0 files.
_HEAD_TYPE = QuantType.Q6_K
# The type for rows that are not a multiple of a K-quant's 256 values: llama.cpp's, but for the types the
# kernel lacks: Q4_K's Q5_0 becomes Q4_1 (Q4_K's form: a scale and an offset per 32), Q5_K's Q5_1 Q8_0 (not
# Q4_1, which would give those tensors fewer bits than the Q5_K around them)
_K_FALLBACK = {QuantType.Q4_K: QuantType.Q4_1, QuantType.Q5_K: QuantType.Q8_0, QuantType.Q6_K: QuantType.Q8_0}
# The GGUF file type of each quantization (general.file_type): llama.cpp names an all-Q4_K file Q4_K_S
_FT = gguf.LlamaFileType
_FILE_TYPES = {Quantization.Q8_0: _FT.MOSTLY_Q8_0, Quantization.Q4_0: _FT.MOSTLY_Q4_0,
               Quantization.Q4_1: _FT.MOSTLY_Q4_1, Quantization.Q4_K: _FT.MOSTLY_Q4_K_S,
               Quantization.Q4_K_M: _FT.MOSTLY_Q4_K_M, Quantization.Q5_K_M: _FT.MOSTLY_Q5_K_M}
_BASE = {Quantization.Q4_K_M: QuantType.Q4_K, Quantization.Q5_K_M: QuantType.Q5_K}


def quant_type(quantization: Quantization) -> QuantType:
    """The quantization's base block type: most projections' and the embedding's (q4_k_m: Q4_K, q5_k_m:
    Q5_K)."""
    return _BASE.get(quantization) or QuantType[quantization.name]


def file_type(quantization: Quantization) -> gguf.LlamaFileType:
    return _FILE_TYPES[quantization]


def target_type(name: str, shape: tuple[int, ...], quantization: Quantization,
                config: ModelConfig) -> QuantType | None:
    """The block type a tensor of a checkpoint (HF name) is stored in, or None to keep it float (norms): one
    rule for quantizing at load and for writing a file, so both give the very same blocks; llama.cpp's
    for the same file type (llama-quant.cpp), but Q4_1 where it falls back to Q5_0 and Q8_0 for Q5_1."""
    if len(shape) != 2:
        return None
    base = quant_type(quantization)
    head = name == "lm_head.weight" or (config.tie_word_embeddings and name == "model.embed_tokens.weight")
    if head:
        kind = QuantType.Q8_0 if base is QuantType.Q8_0 else _HEAD_TYPE
    elif quantization in _BASE:
        kind = k_m_type(name, config.num_layers, base)
    elif quantization is Quantization.Q4_K:
        kind = q4_k_s_type(name, config.num_layers)
    else:
        kind = base
    # a K-quant's rows are super-blocks of 256 values; llama.cpp falls back to a 32-value type as well
    return _K_FALLBACK[kind] if shape[1] % kind.block_elems else kind


def quantize(weight: torch.Tensor, qtype: QuantType) -> QuantTensor:
    """A float [rows, cols] weight (any float dtype) as blocks of `qtype`."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"only a float matrix is quantized, not {weight.dtype} {tuple(weight.shape)}")
    if qtype not in MADE:
        made = ", ".join(q.name for q in MADE)
        raise ValueError(f"{qtype.name} blocks are not made here (only {made})")
    rows, cols = weight.shape
    if cols % qtype.block_elems:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {qtype.block_elems} values, "
                         f"not {cols}")
    out = torch.empty(rows, cols // qtype.block_elems * qtype.block_bytes, dtype=torch.uint8)
    step = max(1, _CHUNK_FLOATS // cols)
    kind = gguf.GGMLQuantizationType(qtype.value)
    made_in_c = _k_quantizer(qtype) if qtype.block_elems == 256 else None  # the K-quants

    def chunk(start: int) -> None:
        floats = weight[start:start + step].detach().to(torch.float32)
        if made_in_c is not None:
            out[start:start + step] = made_in_c(floats.contiguous())
            return
        # A scale past fp16's range becomes inf, as in ggml: numpy would warn on each such chunk.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            blocks = gguf.quants.quantize(floats.numpy(), kind)
        out[start:start + step] = torch.from_numpy(blocks)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        list(pool.map(chunk, range(0, rows, step)))  # list(): a chunk's exception is raised here
    return QuantTensor(out, qtype, rows, cols)


def _k_quantizer(qtype: QuantType) -> Callable[[torch.Tensor], torch.Tensor]:
    """The kernel library's quantizer of a K-quant (float32 rows to blocks)."""
    kernel = load_qlinear()
    if kernel is None:
        raise ValueError(f"{qtype.name} blocks are made by the quantized kernel's C library, which cannot be "
                         "built here (no C compiler): quantize to q8_0 (the 4-bit types' head is Q6_K)")
    return {QuantType.Q4_K: kernel.quantize_q4_k, QuantType.Q5_K: kernel.quantize_q5_k,
            QuantType.Q6_K: kernel.quantize_q6_k}[qtype]


def quantize_weight(name: str, weight: torch.Tensor, quantization: Quantization, config: ModelConfig,
                    dtype: torch.dtype) -> Weight:
    """One checkpoint tensor as the engine keeps it when quantizing at load."""
    kind = target_type(name, tuple(weight.shape), quantization, config)
    return weight.to(dtype) if kind is None else quantize(weight, kind)


def load_hf_quantized(root: Path, dtype: torch.dtype,
                      quantization: Quantization) -> tuple[ModelConfig, StateDict]:
    """A Hugging Face directory with its projections, embedding and head quantized as they are read: what
    exists at once is the blocks so far plus one tensor as stored (and a chunk of it in float32)."""
    total = sum(file.stat().st_size for file in checkpoint_files(root))
    config, _ = hf_tensors(root)  # the types depend on its layers and tying (read as load_hf_dir reads it)
    with progress(total, f"quantizing {root.name} to {quantization.value}") as advance:

        def convert(name: str, tensor: torch.Tensor) -> Weight:
            weight = quantize_weight(name, tensor, quantization, config, dtype)
            advance(name, tensor.nbytes)
            return weight

        return load_hf_dir(root, dtype, convert)


@contextmanager
def progress(total_bytes: int, description: str) -> Iterator[Callable[[str, int], None]]:
    """A progress bar on stderr over the bytes read; yields `advance(tensor_name, nbytes)`."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[tensor]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total_bytes or None, tensor="")

        def advance(name: str, nbytes: int) -> None:
            bar.update(task, advance=nbytes, tensor=name)

        yield advance

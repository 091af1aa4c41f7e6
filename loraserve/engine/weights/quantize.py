"""Float weights to GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K blocks, as ggml's reference quantizer writes them.

The arithmetic is gguf-py's `gguf.quants.quantize` (ggml's reference, `quantize_row_*_ref`, in numpy; the
tests hold it to a literal transcription of the C), and for Q4_K, which gguf-py cannot make, the kernel
library's C (csrc/quantize_k.h: ggml's fitted scales and mins; numpy would take many minutes for a 7B): a
weight goes through it a chunk of rows at a time, so the float32 copy that exists is a chunk's, never a
whole tensor's (a bf16 checkpoint is read as stored and widened chunk by chunk), and the chunks run on a
few threads (numpy and ctypes release the GIL).
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
from loraserve.engine.kernels.qlinear import QuantLinearKernel, load_qlinear
from loraserve.engine.weights.hf import StateDict, checkpoint_files, load_hf_dir
from loraserve.engine.weights.quant import QuantTensor, QuantType, Weight

MADE = (QuantType.Q8_0, QuantType.Q4_0, QuantType.Q4_1, QuantType.Q4_K)
# Rows per chunk: ~4 MB of float32, so that numpy's dozen passes over it mostly stay in cache.
_CHUNK_FLOATS = 1 << 20
_WORKERS = min(8, os.cpu_count() or 1)
# An untied head is where a 4-bit model loses most; llama.cpp gives it a better type (Q6_K) too.
_HEAD_TYPE = QuantType.Q8_0
# Q4_K's type for rows that are not a multiple of 256 values (llama.cpp takes Q5_0, which the kernel lacks;
# Q4_1 has Q4_K's form: a scale and an offset per 32)
_K_FALLBACK = QuantType.Q4_1


def quant_type(quantization: Quantization) -> QuantType:
    return QuantType[quantization.name]


def target_type(name: str, shape: tuple[int, ...], qtype: QuantType) -> QuantType | None:
    """The block type a tensor of a checkpoint is stored in, or None to keep it float (norms): one rule for
    quantizing at load and for writing a file, so both give the very same blocks."""
    if len(shape) != 2:
        return None
    if name == "lm_head.weight":
        return _HEAD_TYPE
    # a K-quant's rows are super-blocks of 256 values; llama.cpp falls back to a 32-value type as well
    return _K_FALLBACK if qtype is QuantType.Q4_K and shape[1] % qtype.block_elems else qtype


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
    kernel = _q4_k_kernel() if qtype is QuantType.Q4_K else None

    def chunk(start: int) -> None:
        floats = weight[start:start + step].detach().to(torch.float32)
        if kernel is not None:
            out[start:start + step] = kernel.quantize_q4_k(floats.contiguous())
            return
        # A scale past fp16's range becomes inf, as in ggml: numpy would warn on each such chunk.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            blocks = gguf.quants.quantize(floats.numpy(), kind)
        out[start:start + step] = torch.from_numpy(blocks)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        list(pool.map(chunk, range(0, rows, step)))  # list(): a chunk's exception is raised here
    return QuantTensor(out, qtype, rows, cols)


def _q4_k_kernel() -> QuantLinearKernel:
    kernel = load_qlinear()
    if kernel is None:
        raise ValueError("Q4_K blocks are made by the quantized kernel's C library, which cannot be built "
                         "here (no C compiler): quantize to q8_0, q4_0 or q4_1")
    return kernel


def quantize_weight(name: str, weight: torch.Tensor, qtype: QuantType, dtype: torch.dtype) -> Weight:
    """One checkpoint tensor as the engine keeps it when quantizing at load."""
    kind = target_type(name, tuple(weight.shape), qtype)
    return weight.to(dtype) if kind is None else quantize(weight, kind)


def load_hf_quantized(root: Path, dtype: torch.dtype, qtype: QuantType) -> tuple[ModelConfig, StateDict]:
    """A Hugging Face directory with its projections and embedding quantized as they are read: what
    exists at once is the blocks so far plus one tensor as stored (and a chunk of it in float32)."""
    total = sum(file.stat().st_size for file in checkpoint_files(root))
    with progress(total, f"quantizing {root.name} to {qtype.name}") as advance:

        def convert(name: str, tensor: torch.Tensor) -> Weight:
            weight = quantize_weight(name, tensor, qtype, dtype)
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

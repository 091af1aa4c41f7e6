"""Projections over GGUF-quantized weights read as they are stored (csrc/qlinear.c).

Why: dequantizing a quantized file at load multiplies its size by 4 to 7 (a 3.8 GB Q4_0 7B becomes 27 GB
of float32), and a decode step reads every weight once, so the bytes it streams set its speed. The kernel
multiplies float32 activations by Q8_0, Q4_0 and Q4_1 blocks in place (a view of the memory-mapped file
will do), quantizing the activations to int8 per block of 32 on the way, as llama.cpp does; the error
that adds is at most amax(x block) / 254 per activation (tests/engine/kernels/test_qlinear.py derives
the bound). Built and cached like the other kernels (cpu.py); None where it cannot be built.
"""

from __future__ import annotations

import ctypes
import functools

import gguf
import torch

from loraserve.engine.kernels.cpu import _cpu_float32, _load
from loraserve.engine.weights.quant import QuantTensor, QuantType

BLOCK_ELEMS = 32  # weights per block, in every type the kernel takes
TYPES = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)


class QuantLinearKernel:
    """y = x @ W.T with W [out, in] as GGUF blocks: uint8 [out, in / 32 * block bytes], each row its blocks
    in order (a tensor's data in a GGUF file)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.qlinear_block_bytes.argtypes = [ctypes.c_int]
        lib.qlinear_block_bytes.restype = ctypes.c_int64
        lib.qlinear_vector_bits.restype = ctypes.c_int
        # GGML type id -> bytes per block of 32 weights, as the library counts them
        self.block_bytes: dict[int, int] = {int(t): int(lib.qlinear_block_bytes(int(t))) for t in TYPES}
        self.vector_bits = int(lib.qlinear_vector_bits())  # 256: the AVX2 path; 0: the scalar fallback
        fn = lib.qlinear_forward
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i, i, p, ctypes.c_int, i, i, p, i, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    def __call__(self, x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int,
                 in_features: int) -> torch.Tensor:
        """x: float32 [T, in] with contiguous rows (T may be 0) -> a new float32 [T, out]. qtype: a GGML
        type id (gguf.GGMLQuantizationType) among `block_bytes`."""
        row_bytes = _row_bytes(self.block_bytes, qtype, in_features)
        if not _cpu_float32(x) or x.dim() != 2 or x.stride(1) != 1:
            raise ValueError("qlinear takes float32 CPU [T, in] activations with contiguous rows")
        if x.shape[1] != in_features:
            raise ValueError(f"qlinear: activations have {x.shape[1]} features, the weight {in_features}")
        _check_blocks(blocks, out_features, row_bytes)
        t = x.shape[0]
        y = torch.empty(t, out_features)
        if t == 0 or out_features == 0:
            return y
        failed = self._fn(x.data_ptr(), t, x.stride(0), blocks.data_ptr(), qtype, out_features, in_features,
                          y.data_ptr(), out_features, torch.get_num_threads())
        if failed == 2:
            raise MemoryError("qlinear could not allocate its quantized copy of the activations")
        if failed:
            raise ValueError(f"qlinear refused type {qtype} with {in_features} input features")
        return y


def _row_bytes(block_bytes: dict[int, int], qtype: int, in_features: int) -> int:
    if qtype not in block_bytes:
        raise ValueError(f"qlinear takes GGML types {sorted(block_bytes)}, not {qtype}")
    if in_features <= 0 or in_features % BLOCK_ELEMS:
        raise ValueError(f"qlinear needs in_features a positive multiple of {BLOCK_ELEMS}, not {in_features}")
    return in_features // BLOCK_ELEMS * block_bytes[qtype]


def _check_blocks(blocks: torch.Tensor, out_features: int, row_bytes: int) -> None:
    if blocks.dtype != torch.uint8 or not blocks.is_cpu or not blocks.is_contiguous() \
            or blocks.shape != (out_features, row_bytes):
        raise ValueError(f"qlinear takes weight blocks as contiguous uint8 CPU [{out_features}, "
                         f"{row_bytes}], not {blocks.dtype} {tuple(blocks.shape)}")


def dequantize(blocks: torch.Tensor, qtype: int, out_features: int, in_features: int) -> torch.Tensor:
    """W as float32 [out, in] (a new copy), by gguf-py's reference dequantization: for tests and tools."""
    sizes = {int(t): int(gguf.GGML_QUANT_SIZES[t][1]) for t in TYPES}
    _check_blocks(blocks, out_features, _row_bytes(sizes, qtype, in_features))
    return QuantTensor(blocks, QuantType(qtype), out_features, in_features).dequantize()


# Built on the first call; None where it cannot be built or loaded.
@functools.cache
def load_qlinear() -> QuantLinearKernel | None:
    return _load("qlinear", QuantLinearKernel)

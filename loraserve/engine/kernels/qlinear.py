"""Projections over GGUF-quantized weights read as they are stored (csrc/qlinear.c).

Why: dequantizing a quantized file at load multiplies its size by 4 to 7 (a 3.8 GB Q4_0 7B becomes 27 GB
of float32), and a decode step reads every weight once, so the bytes it streams set its speed. The kernel
multiplies float32 activations by Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K blocks in place (a view of the
memory-mapped file will do), quantizing the activations to int8 per block of 32 on the way, as llama.cpp
does; the error that adds is at most amax(x block) / 254 per activation (tests/engine/kernels/
test_qlinear.py derives the bound). Built and cached like the other kernels (build.py); None where it
cannot be built.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gguf
import torch

from loraserve.engine.kernels.args import cpu_float32
from loraserve.engine.kernels.build import load_kernel
from loraserve.engine.kernels.huge_pages import weight_buffer
from loraserve.engine.weights.quant import QuantTensor, QuantType

_Q = gguf.GGMLQuantizationType
TYPES = (_Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)
_X8 = 256  # added to a type id: the part is repacked (csrc/qlinear.c)


class QuantLinearKernel:
    """y = x @ W.T with W [out, in] as GGUF blocks: uint8 [out, in / block weights * block bytes] (blocks
    of 32 weights, 256 for the K-quants), each row its blocks in order (a tensor's data in a GGUF file)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.qlinear_row_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.qlinear_row_bytes.restype = ctypes.c_int64
        lib.qlinear_vector_bits.restype = ctypes.c_int
        lib.qlinear_vnni.restype = ctypes.c_int
        # GGML type id -> bytes per block, as the library counts them (a row of one block)
        self.block_bytes: dict[int, int] = {int(t): int(lib.qlinear_row_bytes(int(t), block_elems(t)))
                                            for t in TYPES}
        self.vector_bits = int(lib.qlinear_vector_bits())  # 512: AVX-512 VNNI; 256: AVX2, AVX-VNNI; 0: scalar
        self.vnni = bool(lib.qlinear_vnni())  # integer dots by vpdpbusd (AVX-512 VNNI, AVX-VNNI)
        p, i = ctypes.c_void_p, ctypes.c_int64
        lib.qlinear_x8_bytes.argtypes = [ctypes.c_int, i, i]
        lib.qlinear_x8_bytes.restype = i
        lib.qlinear_x8_pack.argtypes = [p, ctypes.c_int, i, i, p, p, ctypes.c_int]
        lib.qlinear_x8_unpack.argtypes = [p, ctypes.c_int, i, i, p, i, p]
        lib.qlinear_x8_layout.restype = ctypes.c_int
        lib.qlinear_quantize_q4_k.argtypes = [p, i, i, p]
        lib.qlinear_quantize_q4_k.restype = ctypes.c_int
        lib.qlinear_quantize_q5_k.argtypes = [p, i, i, p]
        lib.qlinear_quantize_q5_k.restype = ctypes.c_int
        lib.qlinear_quantize_q6_k.argtypes = [p, i, i, p]
        lib.qlinear_quantize_q6_k.restype = ctypes.c_int
        # which variant of the repacked layout this build writes and reads (builds differ: qlinear_x8.h)
        self.x8_layout = int(lib.qlinear_x8_layout())
        self._lib = lib
        fn = lib.qlinear_forward
        fn.argtypes = [p, i, i, ctypes.c_int, p, p, p, i, p, i, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    @property
    def instructions(self) -> str:
        """The instruction set this build's integer dots run on, in words (logged at engine start)."""
        if self.vnni:
            return "AVX-512 VNNI" if self.vector_bits == 512 else "AVX-VNNI"
        return "AVX2" if self.vector_bits == 256 else "scalar (no AVX2)"

    def __call__(self, x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int,
                 in_features: int) -> torch.Tensor:
        """x: float32 [T, in] with contiguous rows (T may be 0) -> a new float32 [T, out]. qtype: a GGML
        type id (gguf.GGMLQuantizationType) among `block_bytes`."""
        return self.stacked(x, self.parts([(blocks, qtype, out_features)], in_features))

    def repack(self, blocks: torch.Tensor, qtype: int, out_features: int, in_features: int,
               order: torch.Tensor | None = None) -> Repacked:
        """The weight in the kernel's groups of 8 rows (csrc/qlinear_x8.h, qlinear_x8k.h), its row n
        being `blocks`' row order[n]: a new tensor of the same size as the blocks, give or take a group,
        for this build of the kernel (another build may lay the groups out otherwise)."""
        _check_blocks(blocks, out_features, _row_bytes(self.block_bytes, qtype, in_features))
        if order is not None and (order.dtype != torch.int64 or order.shape != (out_features,)
                                  or not order.is_contiguous()):
            raise ValueError(f"a row order is contiguous int64 [{out_features}]")
        size = int(self._lib.qlinear_x8_bytes(qtype, out_features, in_features))
        data = weight_buffer(size)
        if self._lib.qlinear_x8_pack(blocks.data_ptr(), qtype, out_features, in_features,
                                     None if order is None else order.data_ptr(), data.data_ptr(),
                                     torch.get_num_threads()):
            raise ValueError("qlinear_x8_pack: a row order out of range")
        return Repacked(data, qtype, out_features, in_features, self.x8_layout)

    def quantize_q4_k(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 [rows, cols] (cols a multiple of 256, contiguous) as Q4_K blocks, uint8 [rows, cols / 256
        * 144], chosen as llama.cpp's reference quantizer chooses them (csrc/quantize_k.h)."""
        return self._quantize_k(x, "Q4_K", 144, self._lib.qlinear_quantize_q4_k)

    def quantize_q5_k(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 [rows, cols] (cols a multiple of 256, contiguous) as Q5_K blocks, uint8 [rows, cols / 256
        * 176], chosen as llama.cpp's reference quantizer chooses them (csrc/quantize_k.h)."""
        return self._quantize_k(x, "Q5_K", 176, self._lib.qlinear_quantize_q5_k)

    def quantize_q6_k(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 [rows, cols] (cols a multiple of 256, contiguous) as Q6_K blocks, uint8 [rows, cols / 256
        * 210], chosen as llama.cpp's reference quantizer chooses them (csrc/quantize_q6k.h)."""
        return self._quantize_k(x, "Q6_K", 210, self._lib.qlinear_quantize_q6_k)

    @staticmethod
    def _quantize_k(x: torch.Tensor, name: str, block_bytes: int, fn: Callable[..., object]) -> torch.Tensor:
        if not cpu_float32(x) or x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 256:
            raise ValueError(f"{name} quantizes contiguous float32 CPU [rows, 256 k] matrices, not {x.dtype} "
                             f"{tuple(x.shape)}")
        out = torch.empty(x.shape[0], x.shape[1] // 256 * block_bytes, dtype=torch.uint8)
        fn(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
        return out

    def _check_layout(self, w: Repacked) -> None:
        if w.layout != self.x8_layout:
            raise ValueError(f"a weight repacked by another build of the kernel (layout {w.layout}, "
                             f"this build's {self.x8_layout})")

    def stored_rows(self, w: Repacked, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a repacked weight back in the stored layout: uint8 [len(ids), row bytes]."""
        self._check_layout(w)
        ids = ids.to(torch.int64).contiguous()
        row_bytes = _row_bytes(self.block_bytes, w.qtype, w.in_features)
        out = torch.empty(ids.numel(), row_bytes, dtype=torch.uint8)
        if self._lib.qlinear_x8_unpack(w.data.data_ptr(), w.qtype, w.out_features, w.in_features,
                                       ids.data_ptr(), ids.numel(), out.data_ptr()):
            raise IndexError(f"row ids out of range for a weight of {w.out_features} rows")
        return out

    def parts(self, weights: Sequence[Repacked | tuple[torch.Tensor, int, int]], in_features: int) -> Parts:
        """Weights of one fan-in, as stored (blocks, GGML type id, out_features) or repacked, checked
        once, to be multiplied as one matrix of their rows stacked: `stacked` reads each where it lies."""
        specs: list[tuple[torch.Tensor, int, int]] = []
        for w in weights:
            if isinstance(w, Repacked):
                self._check_layout(w)
                if w.in_features != in_features:
                    raise ValueError(f"a repacked weight of {w.in_features} input features, not "
                                     f"{in_features}")
                specs.append((w.data, w.qtype + _X8, w.out_features))
            else:
                blocks, qtype, out_features = w
                _check_blocks(blocks, out_features, _row_bytes(self.block_bytes, qtype, in_features))
                specs.append(w)
        n = len(specs)
        return Parts(in_features, sum(w[2] for w in specs), tuple(w[0] for w in specs),
                     (ctypes.c_void_p * n)(*(w[0].data_ptr() for w in specs)),
                     (ctypes.c_int * n)(*(int(w[1]) for w in specs)),
                     (ctypes.c_int64 * n)(*(w[2] for w in specs)))

    def stacked(self, x: torch.Tensor, parts: Parts) -> torch.Tensor:
        """x: float32 [T, in] with contiguous rows -> a new float32 [T, out], the parts' outputs side by
        side."""
        if not cpu_float32(x) or x.dim() != 2 or x.stride(1) != 1:
            raise ValueError("qlinear takes float32 CPU [T, in] activations with contiguous rows")
        if x.shape[1] != parts.in_features:
            raise ValueError(f"qlinear: activations have {x.shape[1]} features, the weight "
                             f"{parts.in_features}")
        t, n = x.shape[0], parts.out_features
        y = torch.empty(t, n)
        if t == 0 or n == 0:
            return y
        failed = self._fn(x.data_ptr(), t, x.stride(0), len(parts.blocks), parts.pointers, parts.types,
                          parts.rows, parts.in_features, y.data_ptr(), n, torch.get_num_threads())
        if failed == 2:
            raise MemoryError("qlinear could not allocate its quantized copy of the activations")
        if failed:
            raise ValueError(f"qlinear refused types {list(parts.types)} with {parts.in_features} input "
                             f"features")
        return y


@dataclass(frozen=True)
class Repacked:
    """A weight [out_features, in_features] in the kernel's groups of 8 rows (csrc/qlinear_x8.h)."""

    data: torch.Tensor  # uint8, contiguous
    qtype: int  # GGML type id, in TYPES
    out_features: int
    in_features: int
    layout: int  # the packing build's x8_layout: only a build of the same layout reads it


@dataclass(frozen=True)
class Parts:
    """What `stacked` hands the library: the weights' addresses, types and rows as C arrays (made once
    per projection, not per call), and the tensors themselves, which keep the addresses valid."""

    in_features: int
    out_features: int
    blocks: tuple[torch.Tensor, ...]
    pointers: ctypes.Array[ctypes.c_void_p]
    types: ctypes.Array[ctypes.c_int]
    rows: ctypes.Array[ctypes.c_int64]


def block_elems(qtype: int) -> int:
    return int(gguf.GGML_QUANT_SIZES[_Q(qtype)][0])


def _row_bytes(block_bytes: dict[int, int], qtype: int, in_features: int) -> int:
    if qtype not in block_bytes:
        raise ValueError(f"qlinear takes GGML types {sorted(block_bytes)}, not {qtype}")
    elems = block_elems(qtype)
    if in_features <= 0 or in_features % elems:
        raise ValueError(f"qlinear needs in_features a positive multiple of {elems} for {_Q(qtype).name}, "
                         f"not {in_features}")
    return in_features // elems * block_bytes[qtype]


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
    return load_kernel("qlinear", QuantLinearKernel)

"""A GGUF-quantized weight kept as it is stored: rows of blocks, a view of the memory-mapped file.

The engine multiplies these directly (`kernels/qlinear.py`); nothing makes a float copy of the whole
matrix except `dequantize`, which tests and tools use, and the slow path for an engine without the
kernel.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numpy as np
import torch


class QuantType(enum.IntEnum):
    """The block types the engine computes on as stored (their GGML ids)."""

    Q4_0 = int(gguf.GGMLQuantizationType.Q4_0)
    Q4_1 = int(gguf.GGMLQuantizationType.Q4_1)
    Q8_0 = int(gguf.GGMLQuantizationType.Q8_0)
    # K-quants: super-blocks of 256 weights (Q4_K_M / Q5_K_M files, with Q6_K for some tensors)
    Q4_K = int(gguf.GGMLQuantizationType.Q4_K)
    Q5_K = int(gguf.GGMLQuantizationType.Q5_K)
    Q6_K = int(gguf.GGMLQuantizationType.Q6_K)

    @property
    def block_elems(self) -> int:
        return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.value)][0])

    @property
    def block_bytes(self) -> int:
        return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.value)][1])


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's layers that its mixes (Q4_K_M, Q5_K_M) give more bits (llama-quant.cpp): the first and
    last eighth, and every third layer between."""
    n = num_layers
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def _layer_of(tensor: str) -> int | None:
    """The layer of a checkpoint tensor by its HF name (model.layers.N....), None outside the layers."""
    parts = tensor.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def k_m_type(tensor: str, num_layers: int, base: QuantType) -> QuantType:
    """A projection's or the embedding's block type in llama.cpp's Q4_K_M (base Q4_K) or Q5_K_M (base Q5_K)
    mix, by its HF name: `base` throughout but for v and down in Q6_K in the `use_more_bits` layers (the
    head: see quantize.py)."""
    layer = _layer_of(tensor)
    if layer is None or not tensor.endswith(("v_proj.weight", "down_proj.weight")):
        return base
    return QuantType.Q6_K if use_more_bits(layer, num_layers) else base


def q4_k_s_type(tensor: str, num_layers: int) -> QuantType:
    """A projection's or the embedding's block type in llama.cpp's Q4_K_S (llama-quant.cpp): Q4_K but for
    v of the first 4 layers (i_attention_wv < 4) and down of the first eighth (i_layer < n_layer / 8), in
    Q5_K (down: but for Falcon, which no family here is)."""
    layer = _layer_of(tensor)
    if layer is not None and ((tensor.endswith("v_proj.weight") and layer < 4)
                              or (tensor.endswith("down_proj.weight") and layer < num_layers // 8)):
        return QuantType.Q5_K
    return QuantType.Q4_K


@dataclass(frozen=True)
class QuantTensor:
    """A weight [out_features, in_features] as `blocks`: uint8 [out_features, in_features / 32 * block
    bytes], each row its blocks in order."""

    blocks: torch.Tensor
    qtype: QuantType
    out_features: int
    in_features: int
    # A view of a memory-mapped file (GGUF), whose pages `drop_pages` may let go: they are read again
    # from the file if touched. Never set on memory of the process's own, which dropping would zero.
    mapped: bool = False

    def __post_init__(self) -> None:
        q, b = self.qtype, self.blocks
        if self.in_features % q.block_elems or self.out_features < 1:
            raise ValueError(f"a {q.name} weight needs in_features divisible by {q.block_elems}")
        row_bytes = self.in_features // q.block_elems * q.block_bytes
        if b.dtype != torch.uint8 or b.shape != (self.out_features, row_bytes) or not b.is_contiguous():
            raise ValueError(f"{q.name} blocks must be contiguous uint8 [{self.out_features}, {row_bytes}]")

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def drop_pages(self) -> None:
        """Once the blocks were copied (repacked for the kernel), let the file's pages go from this
        process's resident memory, so that loading a file does not hold it twice (`mapped` only)."""
        if self.mapped:
            drop_pages(self.blocks.data_ptr(), self.nbytes)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] matrix (a new copy)."""
        return self._dequantize(self.blocks)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as float32 [len(ids), in]: an embedding lookup dequantizes only the rows it reads."""
        return self._dequantize(self.blocks[ids])

    def _dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        values = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType(self.qtype.value))
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, self.in_features)

    def permute_rows(self, order: torch.Tensor) -> QuantTensor:
        """Rows reordered (a copy): llama.cpp's q/k row order undone without dequantizing."""
        return QuantTensor(self.blocks[order].contiguous(), self.qtype, self.out_features, self.in_features)


@dataclass(frozen=True)
class QuantStack:
    """Quantized weights of one fan-in stacked along the output rows, each left where it lies: a fused
    projection (q, k and v; gate and up) with no concatenated copy of its tensors, whose block types may
    differ (Q4_K_M files keep v in Q6_K)."""

    parts: tuple[QuantTensor, ...]

    def __post_init__(self) -> None:
        if not self.parts or len({p.in_features for p in self.parts}) != 1:
            raise ValueError("a stack of quantized weights needs one or more of one fan-in")

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


Weight = torch.Tensor | QuantTensor | QuantStack

_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_DONTNEED = 4  # Linux


def drop_pages(address: int, size: int) -> None:
    """madvise(DONTNEED) over the whole pages inside [address, address + size) of a file mapping: they
    leave the resident set and are read again from the file if touched. Only for file mappings that
    nothing wrote to (on anonymous memory this zeroes it)."""
    start, end = -(-address // _PAGE) * _PAGE, (address + size) // _PAGE * _PAGE
    if end > start:
        _libc().madvise(start, end - start, _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def random_blocks(rows: int, cols: int, qtype: QuantType, std: float,
                  rng: np.random.Generator) -> QuantTensor:
    """Random weights straight as blocks (no float matrix is made: a 7B model's would be 27 GB), their
    values spread with about `std`: random quants, every block's scale d (and Q4_1's offset) fixed; the
    K-quants' scales as `_random_k_scales` makes them."""
    nb = cols // qtype.block_elems
    blocks = rng.integers(0, 256, size=(rows, nb, qtype.block_bytes), dtype=np.uint8)
    if qtype in (QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K):
        _random_k_scales(blocks, qtype, std, rng)
        return QuantTensor(torch.from_numpy(blocks.reshape(rows, -1)), qtype, rows, cols)
    # std of d * q: uniform nibbles (Q4_0: q - 8 in -8..7) ~4.6 d, uniform int8 ~74 d
    d = std / (74.0 if qtype is QuantType.Q8_0 else 4.6)
    blocks[..., 0:2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    if qtype is QuantType.Q4_1:  # w = d q + m: centred by m = -7.5 d
        blocks[..., 2:4] = np.frombuffer(np.float16(-7.5 * d).tobytes(), dtype=np.uint8)
    return QuantTensor(torch.from_numpy(blocks.reshape(rows, -1)), qtype, rows, cols)


def _random_k_scales(blocks: np.ndarray, qtype: QuantType, std: float, rng: np.random.Generator) -> None:
    """Scales for K-quant super-blocks [..., bytes] of random quants, in place: each piece's integer scale
    drawn from the upper half of its range (6 bits; Q6_K's int8), the super-block's d such that the
    values spread with about `std`. Q4_K / Q5_K pieces are centred (w = d sc (q - mean q)) by mins equal
    to their scales and dmin = mean(q) d."""

    def spread(levels: int, lo: int, hi: int) -> float:  # std of uniform q times rms of uniform scales
        return math.sqrt((levels ** 2 - 1) / 12) * math.sqrt(float(np.mean(np.arange(lo, hi) ** 2.0)))

    def fp16(value: float) -> np.ndarray:
        return np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)

    if qtype is QuantType.Q6_K:  # ql, qh, 16 int8 scales, fp16 d
        blocks[..., 192:208] = rng.integers(32, 128, size=(*blocks.shape[:-1], 16), dtype=np.uint8)
        blocks[..., 208:210] = fp16(std / spread(64, 32, 128))
        return
    levels = 16 if qtype is QuantType.Q4_K else 32
    d = std / spread(levels, 32, 64)
    sc = rng.integers(32, 64, size=(*blocks.shape[:-1], 8), dtype=np.uint8)
    # ggml's 12-byte packing: pieces 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins), pieces
    # 4-7's low nibbles in bytes 8-11 (scale low, min high) and their top 2 bits over bytes 0-7's
    first = sc[..., :4] | (sc[..., 4:] >> 4) << 6
    blocks[..., 0:2], blocks[..., 2:4] = fp16(d), fp16((levels - 1) / 2 * d)
    blocks[..., 4:8] = blocks[..., 8:12] = first
    blocks[..., 12:16] = (sc[..., 4:] & 15) * 17


def fuse(parts: Sequence[Weight], dtype: torch.dtype) -> Weight:
    """Weights stacked along the output rows: quantized ones as stored (a `QuantStack`, no copy), else
    in `dtype`."""
    quant = [p for p in parts if isinstance(p, QuantTensor)]
    if len(quant) == len(parts) and len({p.in_features for p in quant}) == 1:
        return QuantStack(tuple(quant))
    return torch.cat([as_float(p, dtype) for p in parts])


def as_float(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize().to(dtype) if isinstance(w, QuantTensor | QuantStack) else w

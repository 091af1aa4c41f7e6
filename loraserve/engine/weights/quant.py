"""A GGUF-quantized weight kept as it is stored: rows of blocks, a view of the memory-mapped file.

The engine multiplies these directly (`kernels/qlinear.py`); nothing makes a float copy of the whole
matrix except `dequantize`, which tests and tools use, and the slow path for an engine without the
kernel.
"""

from __future__ import annotations

import enum
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

    @property
    def block_elems(self) -> int:
        return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.value)][0])

    @property
    def block_bytes(self) -> int:
        return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.value)][1])


@dataclass(frozen=True)
class QuantTensor:
    """A weight [out_features, in_features] as `blocks`: uint8 [out_features, in_features / 32 * block
    bytes], each row its blocks in order."""

    blocks: torch.Tensor
    qtype: QuantType
    out_features: int
    in_features: int

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

    @staticmethod
    def cat(parts: Sequence[QuantTensor]) -> QuantTensor:
        """Weights of one type stacked along the output rows (a fused projection)."""
        qtype, k = parts[0].qtype, parts[0].in_features
        if any(p.qtype is not qtype or p.in_features != k for p in parts):
            raise ValueError("only weights of one block type and fan-in are fused as stored")
        return QuantTensor(torch.cat([p.blocks for p in parts]), qtype, sum(p.out_features for p in parts), k)


Weight = torch.Tensor | QuantTensor


def random_blocks(rows: int, cols: int, qtype: QuantType, std: float,
                  rng: np.random.Generator) -> QuantTensor:
    """Random weights straight as blocks (no float matrix is made: a 7B model's would be 27 GB), their
    values spread with about `std`: random quants, every block's scale d (and Q4_1's offset) fixed."""
    nb = cols // qtype.block_elems
    blocks = rng.integers(0, 256, size=(rows, nb, qtype.block_bytes), dtype=np.uint8)
    # std of d * q: uniform nibbles (Q4_0: q - 8 in -8..7) ~4.6 d, uniform int8 ~74 d
    d = std / (74.0 if qtype is QuantType.Q8_0 else 4.6)
    blocks[..., 0:2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    if qtype is QuantType.Q4_1:  # w = d q + m: centred by m = -7.5 d
        blocks[..., 2:4] = np.frombuffer(np.float16(-7.5 * d).tobytes(), dtype=np.uint8)
    return QuantTensor(torch.from_numpy(blocks.reshape(rows, -1)), qtype, rows, cols)


def fuse(parts: Sequence[Weight], dtype: torch.dtype) -> Weight:
    """Weights stacked along the output rows: as stored when all are quantized alike, else in `dtype`
    (a file may quantize q, k and v differently)."""
    if all(isinstance(p, QuantTensor) for p in parts):
        quant = [p for p in parts if isinstance(p, QuantTensor)]
        if len({(p.qtype, p.in_features) for p in quant}) == 1:
            return QuantTensor.cat(quant)
    return torch.cat([as_float(p, dtype) for p in parts])


def as_float(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize().to(dtype) if isinstance(w, QuantTensor) else w

"""Projections over GGUF-quantized weights, multiplied as stored (kernels/csrc/qlinear.c).

`QuantProjections` wraps the engine's float backend: a quantized weight becomes a `QuantLinear`, a float
one (norm-adjacent tensors some files keep in F32/F16, or a block type the kernel lacks, dequantized by
the loader) goes to the float backend as before. LoRA deltas are added to the output as for any
projection: the adapters stay unmerged, in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.kernels.qlinear import QuantLinearKernel, Repacked
from loraserve.engine.ops.linear import Projection, Projections, Role
from loraserve.engine.weights.quant import QuantStack, QuantTensor, QuantType, Weight


@dataclass
class QuantLinear:
    """A projection over quantized weights, its parts (one, or a fused projection's) repacked into the
    kernel's groups of 8 rows (every type the kernel takes has them). The repacked part replaces its
    source: nothing here keeps the file's blocks (or a quantized copy) alive beside it."""

    kernel: QuantLinearKernel
    layout: tuple[Repacked, ...]

    @classmethod
    def of(cls, kernel: QuantLinearKernel, weight: QuantTensor | QuantStack) -> QuantLinear:
        return cls(kernel, tuple(_repacked(kernel, p) for p in
                                 (weight.parts if isinstance(weight, QuantStack) else (weight,))))

    def __post_init__(self) -> None:
        self.in_features = self.layout[0].in_features
        self.out_features = sum(p.out_features for p in self.layout)
        self._parts = self.kernel.parts(self.layout, self.in_features)

    @property
    def qtypes(self) -> tuple[QuantType, ...]:
        return tuple(QuantType(p.qtype) for p in self.layout)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.stacked(x if x.stride(1) == 1 else x.contiguous(), self._parts)

    def out_in(self) -> torch.Tensor:
        return torch.cat([self._rows(p, torch.arange(p.out_features)) for p in self.layout])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if len(self.layout) != 1:
            raise TypeError("rows are read from the embedding, never from a fused projection")
        return self._rows(self.layout[0], ids)

    def _rows(self, part: Repacked, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as float32: the rows put back in the stored layout, then dequantized."""
        blocks = self.kernel.stored_rows(part, ids)
        return QuantTensor(blocks, QuantType(part.qtype), blocks.shape[0], part.in_features).dequantize()


def _repacked(kernel: QuantLinearKernel, part: QuantTensor) -> Repacked:
    packed = kernel.repack(part.blocks, int(part.qtype), part.out_features, part.in_features)
    part.drop_pages()  # a file's pages, read once for this copy: not kept resident beside it
    return packed


@dataclass(frozen=True)
class QuantProjections:
    kernel: QuantLinearKernel
    floats: Projections  # for the weights that are not quantized

    def make(self, w: Weight, role: Role) -> Projection:
        if isinstance(w, QuantTensor | QuantStack):
            return QuantLinear.of(self.kernel, w)
        return self.floats.make(w, role)

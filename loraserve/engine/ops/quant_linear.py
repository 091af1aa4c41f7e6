"""Projections over GGUF-quantized weights, multiplied as stored (kernels/csrc/qlinear.c).

`QuantProjections` wraps the engine's float backend: a quantized weight becomes a `QuantLinear`, a float
one (norm-adjacent tensors some files keep in F32/F16, or a block type the kernel lacks, dequantized by
the loader) goes to the float backend as before. LoRA deltas are added to the output as for any
projection: the adapters stay unmerged, in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.kernels.qlinear import QuantLinearKernel
from loraserve.engine.ops.linear import Projection, Projections, Role
from loraserve.engine.weights.quant import QuantTensor, Weight


@dataclass
class QuantLinear:
    kernel: QuantLinearKernel
    weight: QuantTensor

    def __post_init__(self) -> None:
        self.out_features = self.weight.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self.kernel(x if x.stride(1) == 1 else x.contiguous(), w.blocks, int(w.qtype), w.out_features,
                           w.in_features)

    def out_in(self) -> torch.Tensor:
        return self.weight.dequantize()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


@dataclass(frozen=True)
class QuantProjections:
    kernel: QuantLinearKernel
    floats: Projections  # for the weights that are not quantized

    def make(self, w: Weight, role: Role) -> Projection:
        if isinstance(w, QuantTensor):
            return QuantLinear(self.kernel, w)
        return self.floats.make(w, role)

"""Projections: a weight kept in the layout(s) its backend multiplies fastest, and the backends that pick it.

A backend is chosen once per engine (`ops/select.py`) and makes every projection of the model:

- `PackedProjections` (CPU float32 with the C kernel, kernels/csrc/linear.c): each weight packed once in
  column panels, no other copy.
- `MklProjections` (CPU without the kernel): torch's CPU matmul (MKL) is not layout-neutral when a step
  has few rows, so q/k/v and o are kept as [in, out] (never slower), down as [out, in], and gate/up and
  lm_head in both layouts while the second copies are small, [in, out] serving steps of up to
  `SMALL_ROWS` rows. BENCHMARKS.md has the per-matrix timings behind this.
- `DeviceProjections` (CUDA): every weight stays [out, in]; cuBLAS is not this sensitive to it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from loraserve.engine.kernels.cpu import LinearKernel
from loraserve.engine.weights.quant import Weight, as_float

SMALL_ROWS = 4  # steps of at most this many rows use [in, out] when a projection has both layouts
# Second copies (gate/up and lm_head in both layouts) are kept on the CPU while they add at most this
# much: SmolLM2-135M's are 325 MB; a 7B model's would be ~12 GB in fp32.
DUAL_LAYOUT_MAX_BYTES = 1 << 30


class Layout(enum.Enum):
    OUT_IN = enum.auto()  # [out, in], F.linear's
    IN_OUT = enum.auto()  # [in, out]
    BOTH = enum.auto()


class Role(enum.Enum):
    """What a projection is, which is all a backend needs to pick its layout."""

    ATTENTION = enum.auto()  # fused q/k/v, o
    WIDE = enum.auto()  # fused gate/up, lm_head: the large ones
    DOWN = enum.auto()


class Projection(Protocol):
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]."""
        ...

    def out_in(self) -> torch.Tensor:
        """The weight as [out, in] (a view or a copy)."""
        ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as a new [len(ids), in] tensor: the embedding lookup of a tied input embedding."""
        ...


@dataclass
class TorchLinear:
    """A weight for torch's matmul: [out, in] and/or [in, out]."""

    w: torch.Tensor | None  # [out, in]
    wt: torch.Tensor | None  # [in, out]

    def __post_init__(self) -> None:
        if self.w is None and self.wt is None:
            raise ValueError("a TorchLinear needs at least one layout of its weight")
        self.out_features = self.w.shape[0] if self.w is not None else self.wt.shape[1]  # type: ignore[union-attr]

    @classmethod
    def of(cls, w: torch.Tensor, layout: Layout) -> TorchLinear:
        """`w` is [out, in]; an [in, out] copy is made when the layout asks for one."""
        wt = w.t().contiguous() if layout is not Layout.OUT_IN else None
        return cls(w if layout is not Layout.IN_OUT else None, wt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.wt is not None and (self.w is None or x.shape[0] <= SMALL_ROWS):
            return x @ self.wt
        assert self.w is not None  # __post_init__: one of the two exists
        return F.linear(x, self.w)

    def out_in(self) -> torch.Tensor:
        if self.w is not None:
            return self.w
        assert self.wt is not None
        return self.wt.t()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.w is not None:
            return self.w[ids]
        assert self.wt is not None
        return self.wt[:, ids].t().contiguous()


@dataclass
class PackedLinear:
    """A weight packed for the C kernel: [ceil(out / panel), in, panel], the last panel zero-padded."""

    kernel: LinearKernel
    packed: torch.Tensor
    out_features: int

    def __post_init__(self) -> None:
        k, p = self.kernel, self.packed
        if (p.dtype != torch.float32 or not p.is_cpu or not p.is_contiguous() or p.dim() != 3
                or p.shape[2] != k.panel or not 0 < self.out_features <= p.shape[0] * k.panel):
            raise ValueError("packed weights need the linear kernel: "
                             "contiguous float32 CPU [panels, in, panel]")

    @classmethod
    def of(cls, w: torch.Tensor, kernel: LinearKernel) -> PackedLinear:
        """`w` is [out, in]; packed into fresh (64-byte aligned) memory, and kept only so."""
        return cls(kernel, kernel.pack(w), w.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return self.kernel(x if x.stride(1) == 1 else x.contiguous(), self.packed, self.out_features)

    def out_in(self) -> torch.Tensor:
        return self.kernel.unpack(self.packed, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed[ids // self.kernel.panel, :, ids % self.kernel.panel]  # [T, in]


class Projections(Protocol):
    """Makes the model's projections, each from its [out, in] weight (float backends dequantize GGUF
    blocks; `ops/quant_linear.py` multiplies them as stored)."""

    def make(self, w: Weight, role: Role) -> Projection: ...


@dataclass(frozen=True)
class PackedProjections:
    kernel: LinearKernel

    def make(self, w: Weight, role: Role) -> Projection:
        return PackedLinear.of(as_float(w, torch.float32), self.kernel)


@dataclass(frozen=True)
class MklProjections:
    dual: bool  # gate/up and lm_head kept in both layouts (their second copies fit DUAL_LAYOUT_MAX_BYTES)

    @classmethod
    def for_model(cls, wide_bytes: int) -> MklProjections:
        """`wide_bytes`: what the second copies of every WIDE weight would take."""
        return cls(dual=wide_bytes <= DUAL_LAYOUT_MAX_BYTES)

    def make(self, w: Weight, role: Role) -> Projection:
        w = as_float(w, torch.float32)
        layout = {Role.ATTENTION: Layout.IN_OUT, Role.DOWN: Layout.OUT_IN,
                  Role.WIDE: Layout.BOTH if self.dual else Layout.OUT_IN}[role]
        return TorchLinear.of(w, layout)


@dataclass(frozen=True)
class DeviceProjections:
    def make(self, w: Weight, role: Role) -> Projection:
        return TorchLinear(as_float(w, torch.float32), None)

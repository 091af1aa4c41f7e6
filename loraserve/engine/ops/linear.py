"""A projection's weight, kept in the layout(s) its device multiplies fastest.

torch's CPU matmul (MKL) is not layout-neutral when a step has few rows. Measured on this project's
2-core CPU machine, fp32, 2 threads, each matrix rotating through 30 copies so that none stays in
cache (`x @ W.T` with W [out, in], i.e. F.linear, against `x @ Wt` with Wt [in, out]), in us:

| SmolLM2 matrix [out, in] | 1 row     | 2 rows    | 4 rows    | 8 rows    | 32 rows    | 1024 rows     |
|--------------------------|-----------|-----------|-----------|-----------|------------|---------------|
| q/k/v  960 x 576         | 130 / 100 | 193 / 144 | 190 / 180 | 169 / 173 | 276 / 280  | 4949 / 4909   |
| o      576 x 576         |  70 / 59  | 110 / 88  | 103 / 92  |  95 / 96  | 164 / 163  | 2845 / 3007   |
| gate/up 3072 x 576       | 426 / 272 | 705 / 460 | 617 / 554 | 469 / 645 | 826 / 1024 | 16507 / 17181 |
| down   576 x 1536        | 165 / 166 | 252 / 248 | 283 / 262 | 235 / 249 | 430 / 457  | 7764 / 7758   |
| lm_head 49152 x 576      | 6802 / 3874 | 13452 / 7852 | 10901 / 10848 | 10789 / 10646 | 14486 / 17030 | |

So a CPU engine without the C kernels keeps q/k/v and o as [in, out] only (never slower), down as
[out, in], and gate/up and lm_head in both layouts while the second copies are small, using [in, out]
for steps of up to `SMALL_ROWS` rows. With them (cpu_kernels.LinearKernel, csrc/linear.c) MKL is not
used for projections at all: every weight is kept once, packed in the kernel's column panels. On CUDA
every weight stays [out, in] (cuBLAS is not this sensitive to it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.engine.kernels.cpu import LinearKernel

SMALL_ROWS = 4  # steps of at most this many rows use [in, out] when a projection has both layouts
# Second copies (gate/up and lm_head in both layouts) are kept on the CPU while they add at most this
# much: for SmolLM2-135M 325 MB (a single stream ~20% faster); a 7B model's would be ~12 GB in fp32.
DUAL_LAYOUT_MAX_BYTES = 1 << 30


class Layout(enum.Enum):
    OUT_IN = enum.auto()  # [out, in], F.linear's
    IN_OUT = enum.auto()  # [in, out]
    BOTH = enum.auto()


@dataclass
class Linear:
    """A projection's weight in the layout(s) its device multiplies fastest: [out, in] and/or [in, out] for
    torch's matmul, or the C kernel's column panels (then alone)."""

    w: torch.Tensor | None  # [out, in]
    wt: torch.Tensor | None  # [in, out]
    kernel: LinearKernel | None = None  # the CPU kernel, over `packed`
    packed: torch.Tensor | None = None  # [ceil(out / panel), in, panel]: LinearKernel.pack's layout
    out_features: int = 0  # with `packed` (its last panel is zero-padded)

    def __post_init__(self) -> None:
        if self.packed is None:
            if self.w is None and self.wt is None:
                raise ValueError("a Linear needs at least one layout of its weight")
            if self.kernel is not None:
                raise ValueError("the linear kernel reads packed weights (Linear.of packs them)")
            return
        k = self.kernel
        if (k is None or self.packed.dtype != torch.float32 or not self.packed.is_cpu
                or not self.packed.is_contiguous() or self.packed.dim() != 3 or self.packed.shape[2] != k.panel
                or not 0 < self.out_features <= self.packed.shape[0] * k.panel):
            raise ValueError("packed weights need the linear kernel: contiguous float32 CPU [panels, in, panel]")

    @classmethod
    def of(cls, w: torch.Tensor, layout: Layout, kernel: LinearKernel | None = None) -> Linear:
        """`w` is [out, in]. With the kernel it is packed (a copy, in torch's 64-byte aligned memory) and
        kept only so; otherwise an [in, out] copy is made when the layout asks for one."""
        if kernel is not None:
            return cls(None, None, kernel, kernel.pack(w), w.shape[0])
        wt = w.t().contiguous() if layout is not Layout.OUT_IN else None
        return cls(w if layout is not Layout.IN_OUT else None, wt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] -> [T, out]."""
        if self.packed is not None:
            assert self.kernel is not None  # __post_init__
            if x.shape[0] == 0:
                return x.new_empty(0, self.out_features)
            return self.kernel(x if x.stride(1) == 1 else x.contiguous(), self.packed, self.out_features)
        if self.wt is not None and (self.w is None or x.shape[0] <= SMALL_ROWS):
            return x @ self.wt
        assert self.w is not None  # __post_init__: one of the two exists
        return F.linear(x, self.w)

    def out_in(self) -> torch.Tensor:
        """The weight as [out, in] (a view when only [in, out] is kept, a copy when packed)."""
        if self.packed is not None:
            assert self.kernel is not None
            return self.kernel.unpack(self.packed, self.out_features)
        if self.w is not None:
            return self.w
        assert self.wt is not None
        return self.wt.t()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as a new [len(ids), in] tensor: an embedding lookup when the input embedding is tied to
        this (lm_head) weight."""
        if self.packed is not None:
            assert self.kernel is not None
            return self.packed[ids // self.kernel.panel, :, ids % self.kernel.panel]  # [T, in]
        if self.w is not None:
            return self.w[ids]
        assert self.wt is not None
        return self.wt[:, ids].t().contiguous()

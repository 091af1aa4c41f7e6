"""LoRA through the CPU kernel (kernels/csrc/lora_sgmv.c): packed slots, one call per layer group.

Per group of n targets (fan-in K, fan-outs summing to N) a slot holds a: [K * n*R] and b: [R * N], A and B
cut into column tiles stored one after another (lora/pack.py), B without the zero blocks of the fused
groups' block-diagonal form. A step's rows are grouped into segments by slot, each adapter's weights
streamed once however many rows use it; each output element is summed by one thread in a fixed order,
so a row's result does not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.engine.kernels.cpu import LoraSgmv as LoraSgmvKernel
from loraserve.engine.lora.pack import TargetPairs, pack_group
from loraserve.engine.lora.pool import GROUP_TARGETS, LoraGroup, LoraPool, group_shape


@dataclass(frozen=True)
class SgmvLora:
    kernel: LoraSgmvKernel

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        if device.type != "cpu" or dtype not in (torch.float32, torch.float16):
            raise ValueError("packed LoRA slots are for the CPU kernel, float32 or float16 only")

    def slot_shapes(self, fan_in: int, fan_outs: list[int],
                    rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (fan_in * len(fan_outs) * rank,), (rank * sum(fan_outs),)

    def write(self, pool: LoraPool, group: LoraGroup, slot: int, targets: list[TargetPairs]) -> None:
        fan_in, fan_outs = group_shape(pool.cfg, group)
        pack_group(targets, fan_in, fan_outs, pool.rank, self.kernel.tile, pool.a[group][:, slot],
                   pool.b[group][:, slot])

    def part(self, pool: LoraPool, items: list[tuple[int, int]], device: torch.device) -> SgmvPart:
        return SgmvPart.build(pool, self.kernel, items)


@dataclass
class SgmvPart:
    """A packed pool's rows, all applied by the CPU kernel."""

    pool: LoraPool
    kernel: LoraSgmvKernel
    plan: torch.Tensor  # int64 [nseg slots | nseg + 1 starts | rows], as csrc/lora_sgmv.c reads it
    nseg: int
    max_row: int
    h: torch.Tensor  # [rows, width] scratch for the shrink: every group's partial sums fit (kernel.h_width)

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        pool = self.pool
        a, b = pool.layers[group][layer]
        self.kernel(x, out, a, b, pool.rank, pool.cols[group], self.plan, self.nseg, self.max_row, self.h)

    @classmethod
    def build(cls, pool: LoraPool, kernel: LoraSgmvKernel, items: list[tuple[int, int]]) -> SgmvPart:
        """`items` are (slot, batch row) sorted: a segment per slot, its rows in batch order."""
        slots: list[int] = []
        starts: list[int] = []
        for i, (slot, _) in enumerate(items):
            if not slots or slots[-1] != slot:
                slots.append(slot)
                starts.append(i)
        starts.append(len(items))
        if not 0 <= min(slots) <= max(slots) < pool.capacity:  # the kernel indexes the pool by them
            raise ValueError("LoRA slot out of the pool's range")
        plan = torch.tensor(slots + starts + [row for _, row in items], dtype=torch.long)
        width = max(kernel.h_width(fan_in, len(fan_outs) * pool.rank)
                    for fan_in, fan_outs in (group_shape(pool.cfg, g) for g in GROUP_TARGETS))
        return cls(pool, kernel, plan, len(slots), max(row for _, row in items),
                   torch.empty(len(items), width))

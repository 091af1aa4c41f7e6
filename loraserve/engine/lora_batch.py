"""One step's LoRA work: every row gets its own adapter's delta, with a few GEMMs per layer group.

Rows are sorted by slot. Slots used by many rows (a long prefill chunk, a popular adapter) run as
one plain GEMM pair over their contiguous rows. The remaining light slots are padded into a
[slots, M, K] block and run as two batched GEMMs over their contiguous slot range, so each resident
adapter's weights are read once per step however many rows use it (the SGMV idea). On this CPU a
batched GEMM over 16 slots costs ~25 us where torch's grouped GEMM costs ~100 us and a loop of 16
small GEMMs ~100 us; padding rows cost little since the LoRA FLOPs are tiny next to the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraserve.engine.lora import LoraGroup, LoraPool


@dataclass
class LoraBatchPart:
    pool: LoraPool
    rows: torch.Tensor  # [n] batch rows using this pool, sorted by slot
    heavy: list[tuple[int, int, int]]  # (slot, start, end): a slot's rows at [start, end) of the sorted order
    light: torch.Tensor | None  # [nl] sorted-order positions of the padded rows (None: all of them)
    padded: torch.Tensor | None  # [nl] each light row's place in the [(hi - lo) * m] padded block
    # [(hi - lo) * m] the batch row each padded place reads; padding places read any row, since
    # their outputs are dropped, so one gather builds the padded block.
    gather: torch.Tensor | None
    lo: int
    hi: int
    m: int
    singles: list[tuple[int, int, int]]  # light slots run one by one when their slot range is sparse

    def shrink_expand(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(x[rows] @ A_slot) @ B_slot for each sorted row; a: [C, K, R], b: [C, R, N] -> [n, N]."""
        if self.padded is not None and self.gather is not None:
            g = self.hi - self.lo
            xp = x.index_select(0, self.gather).view(g, self.m, -1)  # [G, M, K]
            h = torch.bmm(xp, a[self.lo:self.hi])  # [G, M, R]
            dp = torch.bmm(h, b[self.lo:self.hi]).view(g * self.m, -1).index_select(0, self.padded)  # [nl, N]
            if self.light is None:
                return dp
            d = x.new_empty(self.rows.shape[0], b.shape[2]).index_copy_(0, self.light, dp)
        else:
            d = x.new_empty(self.rows.shape[0], b.shape[2])
        if not (self.heavy or self.singles):
            return d
        xs = x.index_select(0, self.rows)  # [n, K]
        for slot, start, end in self.heavy + self.singles:
            torch.mm(torch.mm(xs[start:end], a[slot]), b[slot], out=d[start:end])
        return d


_Plan = tuple[list[tuple[int, int, int]], torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int, int,
              int, list[tuple[int, int, int]]]


def _plan(slots: list[int], rows: list[int], device: torch.device) -> _Plan:
    """Split sorted `slots` into heavy slots (own GEMMs) and light ones (padded batched GEMMs)."""
    runs: list[tuple[int, int, int]] = []  # (slot, start, end) over the sorted rows
    for i, slot in enumerate(slots):
        if runs and runs[-1][0] == slot:
            runs[-1] = (slot, runs[-1][1], i + 1)
        else:
            runs.append((slot, i, i + 1))
    cap = max(2, math.ceil(2 * len(slots) / len(runs)))  # twice the mean rows per active slot
    heavy = [r for r in runs if r[2] - r[1] > cap]
    light = [r for r in runs if r[2] - r[1] <= cap]
    if not light:
        return heavy, None, None, None, 0, 0, 0, []
    lo, hi = light[0][0], light[-1][0] + 1
    if hi - lo > 2 * len(light) + 2:  # sparse slots: padding would read many idle adapters' weights
        return heavy, None, None, None, 0, 0, 0, light
    m = max(end - start for _, start, end in light)
    positions: list[int] = []
    places: list[int] = []
    gather = [rows[light[0][1]]] * ((hi - lo) * m)
    for slot, start, end in light:
        for j in range(end - start):
            positions.append(start + j)
            places.append((slot - lo) * m + j)
            gather[(slot - lo) * m + j] = rows[start + j]
    light_pos = None if not heavy else torch.tensor(positions, dtype=torch.long, device=device)

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return heavy, light_pos, as_tensor(places), as_tensor(gather), lo, hi, m, []


@dataclass
class LoraBatch:
    parts: list[LoraBatchPart]

    @classmethod
    def build(cls, row_slots: list[tuple[LoraPool, int] | None], device: torch.device) -> LoraBatch | None:
        """`row_slots[i]` is the (pool, slot) of batch row i, or None for a row without an adapter."""
        by_pool: dict[int, tuple[LoraPool, list[tuple[int, int]]]] = {}
        for row, ps in enumerate(row_slots):
            if ps is not None:
                by_pool.setdefault(id(ps[0]), (ps[0], []))[1].append((ps[1], row))
        parts = []
        for pool, items in by_pool.values():
            items.sort()
            row_list = [row for _, row in items]
            heavy, light, padded, gather, lo, hi, m, singles = _plan([slot for slot, _ in items], row_list, device)
            rows = torch.tensor(row_list, dtype=torch.long, device=device)
            parts.append(LoraBatchPart(pool, rows, heavy, light, padded, gather, lo, hi, m, singles))
        return cls(parts) if parts else None

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += (x[rows] @ A_slot) @ B_slot, each row with its own adapter's slot."""
        for p in self.parts:
            d = p.shrink_expand(x, p.pool.a[group][layer], p.pool.b[group][layer])
            out.index_add_(0, p.rows, d)

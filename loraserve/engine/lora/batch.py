"""One step's LoRA work: every row gets its own adapter's delta, with a few GEMMs per layer group.

Slots used by many rows (a long prefill chunk, a popular adapter) run one plain GEMM pair per run of
adjacent batch rows (the model runner puts decode rows of one slot together), added into the output in
place: no gather, no scatter. The remaining light slots are padded into a
[slots, M, K] block and run as two batched GEMMs over their contiguous slot range, so each resident
adapter's weights are read once per step however many rows use it (the SGMV idea). On this CPU a
batched GEMM over 16 slots costs ~25 us where torch's grouped GEMM costs ~100 us and a loop of 16
small GEMMs ~100 us; padding rows cost little since the LoRA FLOPs are tiny next to the base model.

A packed pool (the CPU kernel's, see lora.py) takes none of that: all its rows go to `lora_sgmv` in one
call per layer group, as segments of rows sharing a slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraserve.engine.lora.pool import GROUP_TARGETS, LoraGroup, LoraPool


@dataclass
class LoraBatchPart:
    pool: LoraPool
    # (slot, first, end): batch rows [first, end) use `slot` and get their own GEMM pair, added in place.
    heavy: list[tuple[int, int, int]]
    singles: list[tuple[int, int, int]]  # the same for light slots whose slot range is too sparse to pad
    light_rows: torch.Tensor | None  # [nl] batch rows of the padded block's real places, in place order
    padded: torch.Tensor | None  # [nl] each of those rows' place in the [(hi - lo) * m] padded block
    # [(hi - lo) * m] the batch row each padded place reads; padding places read any row, since
    # their outputs are dropped, so one gather builds the padded block.
    gather: torch.Tensor | None
    lo: int
    hi: int
    m: int

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[row] += (x[row] @ A_slot) @ B_slot for this pool's rows."""
        a, b = self.pool.a[group][layer], self.pool.b[group][layer]  # a: [C, K, nR], b: [C, nR, N]
        for slot, first, end in self.heavy + self.singles:
            out[first:end].addmm_(torch.mm(x[first:end], a[slot]), b[slot])
        if self.padded is not None and self.gather is not None and self.light_rows is not None:
            g = self.hi - self.lo
            xp = x.index_select(0, self.gather).view(g, self.m, -1)  # [G, M, K]
            h = torch.bmm(xp, a[self.lo:self.hi])  # [G, M, R]
            dp = torch.bmm(h, b[self.lo:self.hi]).view(g * self.m, -1).index_select(0, self.padded)  # [nl, N]
            out.index_add_(0, self.light_rows, dp)


@dataclass
class SgmvPart:
    """A packed pool's rows, all applied by the CPU kernel."""

    pool: LoraPool
    plan: torch.Tensor  # int64 [nseg slots | nseg + 1 starts | rows], as csrc/lora_sgmv.c reads it
    nseg: int
    max_row: int
    h: torch.Tensor  # [rows, n*R] scratch for the shrink, n the most targets a group fuses (q/k/v: 3)

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        pool = self.pool
        assert pool.sgmv is not None  # `_part` makes an SgmvPart for packed pools only
        pool.sgmv(x, out, pool.a[group][layer], pool.b[group][layer], pool.rank, pool.cols[group], self.plan,
                  self.nseg, self.max_row, self.h)

    @classmethod
    def build(cls, pool: LoraPool, items: list[tuple[int, int]]) -> SgmvPart:
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
        width = max(len(targets) for targets in GROUP_TARGETS.values()) * pool.rank
        return cls(pool, plan, len(slots), max(row for _, row in items), torch.empty(len(items), width))


_HEAVY_ROWS = 32  # a slot with this many rows runs a GEMM pair efficiently on its own


def _segments(slot: int, rows: list[int]) -> list[tuple[int, int, int]]:
    """Split a slot's ascending batch rows into runs of consecutive rows: (slot, first, end)."""
    out: list[tuple[int, int, int]] = []
    for row in rows:
        if out and out[-1][2] == row:
            out[-1] = (slot, out[-1][1], row + 1)
        else:
            out.append((slot, row, row + 1))
    return out


def _part(pool: LoraPool, items: list[tuple[int, int]], device: torch.device) -> LoraBatchPart | SgmvPart:
    """Plan one pool's rows; `items` are (slot, batch row) sorted. Heavy slots get their own GEMMs,
    light ones a padded batched GEMM pair over their slot range (or GEMMs of their own when sparse)."""
    if pool.sgmv is not None:
        return SgmvPart.build(pool, items)
    by_slot: dict[int, list[int]] = {}
    for slot, row in items:
        by_slot.setdefault(slot, []).append(row)
    # Heavy: more than twice the mean rows per active slot, or more than _HEAVY_ROWS rows at all. The
    # second rule is for prefill chunks: 8 prompts of 128 tokens over 5 adapters made a padded block of
    # 8 x 384 rows for 1024 real ones, and the gate/up LoRA took 15 ms a layer instead of ~4.
    cap = min(_HEAVY_ROWS, max(2, math.ceil(2 * len(items) / len(by_slot))))
    heavy = [seg for slot, rows in by_slot.items() if len(rows) > cap for seg in _segments(slot, rows)]
    light = {slot: rows for slot, rows in by_slot.items() if len(rows) <= cap}
    if not light:
        return LoraBatchPart(pool, heavy, [], None, None, None, 0, 0, 0)
    lo, hi = min(light), max(light) + 1
    # One or two light slots: their own GEMM pairs take fewer ops than a padded block (a single stream's
    # LoRA is ~120 groups x a handful of ops a token, each op ~5 us of dispatch here). Sparse slots:
    # padding would read many idle adapters' weights.
    if len(light) <= 2 or hi - lo > 2 * len(light) + 2:
        singles = [seg for slot, rows in light.items() for seg in _segments(slot, rows)]
        return LoraBatchPart(pool, heavy, singles, None, None, None, 0, 0, 0)
    m = max(len(rows) for rows in light.values())
    first_row = next(iter(light.values()))[0]
    gather = [first_row] * ((hi - lo) * m)
    light_rows: list[int] = []
    places: list[int] = []
    for slot, rows in light.items():
        for j, row in enumerate(rows):
            light_rows.append(row)
            places.append((slot - lo) * m + j)
            gather[(slot - lo) * m + j] = row

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return LoraBatchPart(pool, heavy, [], as_tensor(light_rows), as_tensor(places), as_tensor(gather), lo, hi, m)


@dataclass
class LoraBatch:
    parts: list[LoraBatchPart | SgmvPart]

    @classmethod
    def build(cls, row_slots: list[tuple[LoraPool, int] | None], device: torch.device) -> LoraBatch | None:
        """`row_slots[i]` is the (pool, slot) of batch row i, or None for a row without an adapter. Rows
        of one slot should be adjacent (the model runner orders decode rows by slot): each run of
        adjacent rows of a heavy slot is one GEMM pair."""
        by_pool: dict[int, tuple[LoraPool, list[tuple[int, int]]]] = {}
        for row, ps in enumerate(row_slots):
            if ps is not None:
                by_pool.setdefault(id(ps[0]), (ps[0], []))[1].append((ps[1], row))
        parts = [_part(pool, sorted(items), device) for pool, items in by_pool.values()]
        return cls(parts) if parts else None

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += (x[rows] @ A_slot) @ B_slot, each row with its own adapter's slot."""
        for p in self.parts:
            p.apply(layer, group, x, out)

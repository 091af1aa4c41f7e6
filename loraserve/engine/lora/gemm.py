"""LoRA through torch's GEMMs (CPU without the kernel, and CUDA's eager steps): dense slot layout.

Per group and rank bucket, every slot holds A as [in, n*R] (the targets side by side) and B as a
block-diagonal [n*R, out], with `lora_alpha / r` folded into B. Slots used by many rows (a long prefill
chunk, a popular adapter) run one plain GEMM pair per run of adjacent batch rows (the model runner puts
decode rows of one slot together), added into the output in place: no gather, no scatter. The remaining
light slots are padded into a [slots, M, K] block and run as two batched GEMMs over their contiguous
slot range, so each resident adapter's weights are read once per step however many rows use it (the
SGMV idea): on a 2-core CPU one batched GEMM over 16 slots beat torch's grouped GEMM and a loop of small
GEMMs by ~4x (BENCHMARKS.md); padding rows cost little since the LoRA FLOPs are tiny next to the base
model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraserve.engine.lora.pack import TargetPairs, dense_group
from loraserve.engine.lora.pool import LoraGroup, LoraPool, group_shape


@dataclass(frozen=True)
class GemmLora:
    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        return None  # any float dtype torch multiplies on that device

    def slot_shapes(self, fan_in: int, fan_outs: list[int],
                    rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = len(fan_outs) * rank
        return (fan_in, n), (n, sum(fan_outs))

    def write(self, pool: LoraPool, group: LoraGroup, slot: int, targets: list[TargetPairs]) -> None:
        fan_in, fan_outs = group_shape(pool.cfg, group)
        r_max = pool.rank
        # Built on the host, then one copy a target (a handful of copies to a GPU, not one a layer).
        a, bs = dense_group(targets, fan_in, fan_outs, r_max, pool.a[group].dtype)
        b_slot = pool.b[group][:, slot]  # [L, n*R, N]
        b_slot.zero_()
        for j, b in enumerate(bs):
            c0 = int(pool.cols[group][j])
            b_slot[:, j * r_max:(j + 1) * r_max, c0:c0 + fan_outs[j]] = b
        pool.a[group][:, slot] = a

    def part(self, pool: LoraPool, items: list[tuple[int, int]], device: torch.device) -> LoraBatchPart:
        return _part(pool, items, device)


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


def _part(pool: LoraPool, items: list[tuple[int, int]], device: torch.device) -> LoraBatchPart:
    """Plan one pool's rows; `items` are (slot, batch row) sorted. Heavy slots get their own GEMMs,
    light ones a padded batched GEMM pair over their slot range (or GEMMs of their own when sparse)."""
    by_slot: dict[int, list[int]] = {}
    for slot, row in items:
        by_slot.setdefault(slot, []).append(row)
    # Heavy: more than twice the mean rows per active slot, or more than _HEAVY_ROWS rows at all. The
    # second rule is for prefill chunks: 8 prompts of 128 tokens over 5 adapters would make a padded
    # block of 8 x 384 rows for 1024 real ones, three times the work.
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

    return LoraBatchPart(pool, heavy, [], as_tensor(light_rows), as_tensor(places), as_tensor(gather),
                         lo, hi, m)

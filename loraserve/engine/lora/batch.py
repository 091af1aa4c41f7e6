"""One step's LoRA work: every row gets its own adapter's delta, planned per pool by its backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loraserve.engine.lora.pool import LoraGroup, LoraPool


class LoraPart(Protocol):
    """A pool's share of a step, planned once and applied at every layer and group."""

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[row] += (x[row] @ A_slot) @ B_slot for this pool's rows."""
        ...


@dataclass
class LoraBatch:
    parts: list[LoraPart]

    @classmethod
    def build(cls, row_slots: list[tuple[LoraPool, int] | None], device: torch.device) -> LoraBatch | None:
        """`row_slots[i]` is the (pool, slot) of batch row i, or None for a row without an adapter. Rows
        of one slot should be adjacent (the model runner orders decode rows by slot)."""
        by_pool: dict[int, tuple[LoraPool, list[tuple[int, int]]]] = {}
        for row, ps in enumerate(row_slots):
            if ps is not None:
                by_pool.setdefault(id(ps[0]), (ps[0], []))[1].append((ps[1], row))
        parts = [pool.backend.part(pool, sorted(items), device) for pool, items in by_pool.values()]
        return cls(parts) if parts else None

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += (x[rows] @ A_slot) @ B_slot, each row with its own adapter's slot."""
        for p in self.parts:
            p.apply(layer, group, x, out)

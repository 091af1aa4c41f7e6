"""LoRA math for mixed batches: adapters in stacked device slots, applied with grouped GEMMs.

The projections that share an input are fused (q/k/v, gate/up), so a layer applies four LoRA groups.
Per group and rank bucket, every slot holds A as [in, n*R] (the targets side by side) and B as a
block-diagonal [n*R, out], with `lora_alpha / r` folded into B. `lora_batch.py` applies them to a
mixed batch. A pool's layout and how a step applies it belong to its LoRA backend (`lora/gemm.py`,
`lora/sgmv.py`), chosen once per engine: with the CPU kernel a pool is packed (A and B cut into column
tiles stored one after another, B without its zero blocks), so the kernel streams each adapter's true
size once, in float32 or (EngineConfig.lora_dtype) float16.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.lora.pack import ScaledPair, TargetPairs

if TYPE_CHECKING:
    from loraserve.engine.lora.batch import LoraPart


class LoraGroup(enum.IntEnum):
    QKV = 0
    OUT = 1
    GATE_UP = 2
    DOWN = 3


GROUP_TARGETS: dict[LoraGroup, tuple[str, ...]] = {
    LoraGroup.QKV: ("q_proj", "k_proj", "v_proj"),
    LoraGroup.OUT: ("o_proj",),
    LoraGroup.GATE_UP: ("gate_proj", "up_proj"),
    LoraGroup.DOWN: ("down_proj",),
}


@dataclass
class LoraWeights:
    """One adapter in host memory: per (layer, target) A [r, in] and B [out, r] as stored (any float dtype;
    adapter_file.py maps them from the file) and the factor B is applied with (`scales`: lora_alpha / r,
    or / sqrt(r) with rsLoRA; 1 where absent). Writing a slot folds the scale in and casts, in float32."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scales: dict[tuple[int, str], float] = field(default_factory=dict)
    rank: int = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.rank = max((a.shape[0] for a, _ in self.modules.values()), default=1)
        self.nbytes = sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _scaled(w: LoraWeights, module: tuple[int, str]) -> ScaledPair | None:
    pair = w.modules.get(module)
    return None if pair is None else (pair[0], pair[1], w.scales.get(module, 1.0))


def rank_bucket(rank: int) -> int:
    """Slots are sized by powers of two (min 8) so mixed ranks waste at most half their slot."""
    return max(8, 1 << (rank - 1).bit_length())


class LoraBackend(Protocol):
    """How a pool lays out its slots and how a step applies them: one per engine (`ops/select.py`)."""

    def check(self, dtype: torch.dtype, device: torch.device) -> None:
        """Raises ValueError when slots of this dtype on this device cannot be used."""
        ...

    def slot_shapes(self, fan_in: int, fan_outs: list[int],
                    rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per layer and slot, the shapes of a group's A and B."""
        ...

    def write(self, pool: LoraPool, group: LoraGroup, slot: int, targets: list[TargetPairs]) -> None:
        """One group of an adapter (per target, per layer: A, B, scale) into `slot`, scale folded in."""
        ...

    def part(self, pool: LoraPool, items: list[tuple[int, int]], device: torch.device) -> LoraPart:
        """A step's plan for this pool's rows; `items` are (slot, batch row), sorted."""
        ...


def group_shape(cfg: ModelConfig, group: LoraGroup) -> tuple[int, list[int]]:
    """(fan-in, per-target fan-outs) of a group."""
    shapes = cfg.lora_shapes()
    targets = GROUP_TARGETS[group]
    return shapes[targets[0]][0], [shapes[t][1] for t in targets]


class LoraPool:
    """Device slots for adapters of one rank bucket R; slot memory is touched only when written."""

    def __init__(self, cfg: ModelConfig, rank: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 backend: LoraBackend):
        backend.check(dtype, device)
        self.cfg, self.rank, self.capacity, self.backend = cfg, rank, capacity, backend
        # One slot past the capacity stays zero: rows of a static (CUDA-graph) batch that use no adapter
        # of this pool read it, so every row can gather "its" weights without a branch.
        self.zero_slot = capacity
        self.a: list[torch.Tensor] = []
        self.b: list[torch.Tensor] = []
        self.cols: list[torch.Tensor] = []  # per group: [n + 1] int64 first output column of each target
        for group in LoraGroup:
            fan_in, fan_outs = group_shape(cfg, group)
            self.cols.append(torch.tensor([sum(fan_outs[:j]) for j in range(len(fan_outs) + 1)]))
            a_shape, b_shape = backend.slot_shapes(fan_in, fan_outs, rank)
            # empty, not zeros: pages of never-used slots stay uncommitted; `write` zeroes a slot first.
            self.a.append(torch.empty(cfg.num_layers, capacity + 1, *a_shape, dtype=dtype, device=device))
            self.b.append(torch.empty(cfg.num_layers, capacity + 1, *b_shape, dtype=dtype, device=device))
            self.a[-1][:, capacity].zero_()
            self.b[-1][:, capacity].zero_()
        # Per group and layer, its (a, b) slots: views made once, not two indexing operators a call.
        self.layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
            list(zip(a.unbind(0), b.unbind(0), strict=True)) for a, b in zip(self.a, self.b, strict=True)]

    @staticmethod
    def slot_bytes(cfg: ModelConfig, rank: int, itemsize: int, backend: LoraBackend) -> int:
        total = 0
        for group in LoraGroup:
            fan_in, fan_outs = group_shape(cfg, group)
            a_shape, b_shape = backend.slot_shapes(fan_in, fan_outs, rank)
            total += math.prod(a_shape) + math.prod(b_shape)
        return total * cfg.num_layers * itemsize

    def write(self, slot: int, w: LoraWeights) -> None:
        n_l = self.cfg.num_layers
        for group in LoraGroup:
            targets = [[_scaled(w, (layer, t)) for layer in range(n_l)] for t in GROUP_TARGETS[group]]
            self.backend.write(self, group, slot, targets)

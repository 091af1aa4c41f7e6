"""LoRA math for mixed batches: adapters in stacked device slots, applied with grouped GEMMs.

The projections that share an input are fused (q/k/v, gate/up), so a layer applies four LoRA groups.
Per group and rank bucket, every slot holds A as [in, n*R] (the targets side by side) and B as a
block-diagonal [n*R, out], with `lora_alpha / r` folded into B. `lora_batch.py` applies them to a
mixed batch. With the CPU kernel (cpu_kernels.LoraSgmv) a pool is packed instead: A and B cut into
column tiles stored one after another, B without its zero blocks (see csrc/lora_sgmv.c), so the
kernel streams each adapter's true size once, in float32 or (EngineConfig.lora_dtype) float16.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.kernels.cpu import LoraSgmv
from loraserve.engine.lora.pack import ScaledPair, dense_group, pack_group


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


class LoraPool:
    """Device slots for adapters of one rank bucket R; slot memory is touched only when written.

    Layouts per group (n targets, fan-in K, fan-outs summing to N): with `sgmv` None, a [L, C + 1, K, n*R]
    and b [L, C + 1, n*R, N] block-diagonal (torch's GEMMs, CUDA graphs); with `sgmv`, packed for it:
    a [L, C + 1, K * n*R] and b [L, C + 1, R * N] (no zero blocks: 1/n of B's size).
    """

    def __init__(self, cfg: ModelConfig, rank: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 sgmv: LoraSgmv | None = None):
        if sgmv is not None and (device.type != "cpu" or dtype not in (torch.float32, torch.float16)):
            raise ValueError("packed LoRA slots are for the CPU kernel, float32 or float16 only")
        self.cfg, self.rank, self.capacity, self.sgmv = cfg, rank, capacity, sgmv
        # One slot past the capacity stays zero: rows of a static (CUDA-graph) batch that use no adapter
        # of this pool read it, so every row can gather "its" weights without a branch.
        self.zero_slot = capacity
        self.a: list[torch.Tensor] = []
        self.b: list[torch.Tensor] = []
        self.cols: list[torch.Tensor] = []  # per group: [n + 1] int64 first output column of each target
        for group in LoraGroup:
            fan_in, fan_outs = self._group_shape(cfg, group)
            n = len(fan_outs) * rank
            self.cols.append(torch.tensor([sum(fan_outs[:j]) for j in range(len(fan_outs) + 1)]))
            a_shape = (fan_in, n) if sgmv is None else (fan_in * n,)
            b_shape = (n, sum(fan_outs)) if sgmv is None else (rank * sum(fan_outs),)
            # empty, not zeros: pages of never-used slots stay uncommitted; `write` zeroes a slot first.
            self.a.append(torch.empty(cfg.num_layers, capacity + 1, *a_shape, dtype=dtype, device=device))
            self.b.append(torch.empty(cfg.num_layers, capacity + 1, *b_shape, dtype=dtype, device=device))
            self.a[-1][:, capacity].zero_()
            self.b[-1][:, capacity].zero_()

    @staticmethod
    def _group_shape(cfg: ModelConfig, group: LoraGroup) -> tuple[int, list[int]]:
        shapes = cfg.lora_shapes()
        targets = GROUP_TARGETS[group]
        return shapes[targets[0]][0], [shapes[t][1] for t in targets]

    @staticmethod
    def slot_bytes(cfg: ModelConfig, rank: int, itemsize: int, packed: bool = False) -> int:
        total = 0
        for group in LoraGroup:
            fan_in, fan_outs = LoraPool._group_shape(cfg, group)
            n = len(fan_outs) * rank
            total += fan_in * n + (rank if packed else n) * sum(fan_outs)
        return total * cfg.num_layers * itemsize

    def write(self, slot: int, w: LoraWeights) -> None:
        n_l, r_max = self.cfg.num_layers, self.rank
        for group in LoraGroup:
            fan_in, fan_outs = self._group_shape(self.cfg, group)
            targets = [[_scaled(w, (layer, t)) for layer in range(n_l)] for t in GROUP_TARGETS[group]]
            if self.sgmv is not None:
                pack_group(targets, fan_in, fan_outs, r_max, self.sgmv.tile, self.a[group][:, slot],
                           self.b[group][:, slot])
                continue
            # Built on the host, then one copy a target (a handful of copies to a GPU, not one a layer).
            a, bs = dense_group(targets, fan_in, fan_outs, r_max, self.a[group].dtype)
            b_slot = self.b[group][:, slot]  # [L, n*R, N]
            b_slot.zero_()
            for j, b in enumerate(bs):
                c0 = int(self.cols[group][j])
                b_slot[:, j * r_max:(j + 1) * r_max, c0:c0 + fan_outs[j]] = b
            self.a[group][:, slot] = a

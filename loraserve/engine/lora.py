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
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraserve.engine.config import ModelConfig, module_name
from loraserve.engine.cpu_kernels import LoraSgmv
from loraserve.types import AdapterRef


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
_NAME = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass
class LoraWeights:
    """One adapter in host memory: per (layer, target) the pair A [r, in], B [out, r] with the scale folded in."""

    key: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    rank: int = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.rank = max((a.shape[0] for a, _ in self.modules.values()), default=1)
        self.nbytes = sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    # PEFT matches rank/alpha patterns as a suffix of the module's dotted name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return default


def load_adapter(ref: AdapterRef, cfg: ModelConfig, dtype: torch.dtype) -> LoraWeights:
    """Parse a PEFT adapter folder. The registry validated it at upload; this re-checks shapes cheaply."""
    folder = Path(ref.path)
    conf = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    alpha = float(conf.get("lora_alpha", conf.get("r", 8)))
    rslora = bool(conf.get("use_rslora", False))
    alpha_pattern = conf.get("alpha_pattern") or {}
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    shapes = cfg.lora_shapes()
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _NAME.search(name)
        if m is None or m.group(2) not in shapes or int(m.group(1)) >= cfg.num_layers:
            raise ValueError(f"adapter tensor {name} does not belong to this model")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), ab in pairs.items():
        a, b = ab["A"].float(), ab["B"].float()  # a: [r, in], b: [out, r]
        r = a.shape[0]
        fan_in, fan_out = shapes[target]
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise ValueError(f"adapter tensors for layer {layer} {target} have shapes {a.shape}, {b.shape}")
        mod_alpha = _pattern_value(alpha_pattern, f"base_model.model.{module_name(layer, target)}", alpha)
        scale = mod_alpha / math.sqrt(r) if rslora else mod_alpha / r
        a_cast, b_cast = a.to(dtype), (b * scale).to(dtype)
        # Finite at upload can still overflow here: B times a large alpha/r, cast to fp16 or bf16.
        if not (torch.isfinite(a_cast).all() and torch.isfinite(b_cast).all()):
            raise ValueError(f"layer {layer} {target}: weights times lora_alpha/r ({scale:g}) overflow {dtype}")
        modules[(layer, target)] = (a_cast, b_cast)
    return LoraWeights(ref.key, modules)


def rank_bucket(rank: int) -> int:
    """Slots are sized by powers of two (min 8) so mixed ranks waste at most half their slot."""
    return max(8, 1 << (rank - 1).bit_length())


def _pack_tiles(m: torch.Tensor, tile: int) -> torch.Tensor:
    """[L, rows, cols] -> [L, rows * cols]: column tiles of `tile` (the last may be narrower) one after
    another, each [rows, w] row-major, so the tile at column c starts at rows * c."""
    n_l, rows, cols = m.shape
    full = cols - cols % tile
    parts = [m[:, :, :full].reshape(n_l, rows, full // tile, tile).transpose(1, 2).reshape(n_l, rows * full)]
    if full < cols:
        parts.append(m[:, :, full:].reshape(n_l, rows * (cols - full)))
    return torch.cat(parts, dim=1)


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
            targets = GROUP_TARGETS[group]
            a = torch.zeros(n_l, fan_in, len(targets) * r_max, dtype=self.a[group].dtype)  # [L, K, n*R]
            bs = [torch.zeros(n_l, r_max, fo, dtype=self.b[group].dtype) for fo in fan_outs]  # [L, R, out_j]
            for j, target in enumerate(targets):
                for layer in range(n_l):
                    pair = w.modules.get((layer, target))
                    if pair is not None:
                        wa, wb = pair
                        r = wa.shape[0]
                        a[layer, :, j * r_max:j * r_max + r] = wa.t()
                        bs[j][layer, :r] = wb.t()
            if self.sgmv is not None:
                self.a[group][:, slot] = _pack_tiles(a, self.sgmv.tile)
                self.b[group][:, slot] = torch.cat([_pack_tiles(b, self.sgmv.tile) for b in bs], dim=1)
                continue
            self.a[group][:, slot] = a
            b_slot = self.b[group][:, slot]  # [L, n*R, N]
            b_slot.zero_()
            for j, b in enumerate(bs):
                c0 = int(self.cols[group][j])
                b_slot[:, j * r_max:(j + 1) * r_max, c0:c0 + fan_outs[j]] = b

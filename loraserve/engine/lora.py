"""LoRA math for mixed batches: adapters in stacked device slots, applied with grouped GEMMs.

The projections that share an input are fused (q/k/v, gate/up), so a layer applies four LoRA groups.
Per group and rank bucket, every slot holds A as [in, n*R] (the targets side by side) and B as a
block-diagonal [n*R, out], with `lora_alpha / r` folded into B. `lora_batch.py` applies them to a
mixed batch.
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


class LoraPool:
    """Device slots for adapters of one rank bucket R; slot memory is touched only when written."""

    def __init__(self, cfg: ModelConfig, rank: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.cfg, self.rank, self.capacity = cfg, rank, capacity
        # One slot past the capacity stays zero: rows of a static (CUDA-graph) batch that use no adapter
        # of this pool read it, so every row can gather "its" weights without a branch.
        self.zero_slot = capacity
        shapes = cfg.lora_shapes()
        self.a: list[torch.Tensor] = []  # per group: [L, C + 1, in, n*R]
        self.b: list[torch.Tensor] = []  # per group: [L, C + 1, n*R, sum(out)]
        for group in LoraGroup:
            targets = GROUP_TARGETS[group]
            fan_in = shapes[targets[0]][0]
            fan_out = sum(shapes[t][1] for t in targets)
            n = len(targets) * rank
            # empty, not zeros: pages of never-used slots stay uncommitted; `write` zeroes a slot first.
            self.a.append(torch.empty(cfg.num_layers, capacity + 1, fan_in, n, dtype=dtype, device=device))
            self.b.append(torch.empty(cfg.num_layers, capacity + 1, n, fan_out, dtype=dtype, device=device))
            self.a[-1][:, capacity].zero_()
            self.b[-1][:, capacity].zero_()

    @staticmethod
    def slot_bytes(cfg: ModelConfig, rank: int, itemsize: int) -> int:
        shapes = cfg.lora_shapes()
        total = 0
        for targets in GROUP_TARGETS.values():
            n = len(targets) * rank
            total += shapes[targets[0]][0] * n + n * sum(shapes[t][1] for t in targets)
        return total * cfg.num_layers * itemsize

    def write(self, slot: int, w: LoraWeights) -> None:
        shapes = self.cfg.lora_shapes()
        for group in LoraGroup:
            a, b = self.a[group][:, slot], self.b[group][:, slot]  # a: [L, in, n*R], b: [L, n*R, out]
            a.zero_()
            b.zero_()
            out_off = 0
            for j, target in enumerate(GROUP_TARGETS[group]):
                fan_out = shapes[target][1]
                for layer in range(self.cfg.num_layers):
                    pair = w.modules.get((layer, target))
                    if pair is None:
                        continue
                    wa, wb = pair
                    r = wa.shape[0]
                    a[layer, :, j * self.rank:j * self.rank + r] = wa.t()
                    b[layer, j * self.rank:j * self.rank + r, out_off:out_off + fan_out] = wb.t()
                out_off += fan_out

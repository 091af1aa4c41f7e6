"""LoRA math for mixed batches: adapters in stacked device slots, applied with grouped GEMMs.

The projections that share an input are fused (q/k/v, gate/up), so a layer applies four LoRA groups.
Per group and rank bucket, every slot holds A as [in, n*R] (the targets side by side) and B as a
block-diagonal [n*R, out], with `lora_alpha / r` folded into B. A step sorts its LoRA rows by slot and
runs one grouped GEMM for the shrink and one for the expand (the SGMV idea): each resident adapter's
weights are read once per step however many rows use it, and idle slots cost nothing.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraserve.engine.config import ModelConfig
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
    conf = json.loads((folder / "adapter_config.json").read_text())
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
        kind = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        mod_alpha = _pattern_value(alpha_pattern, f"base_model.model.model.layers.{layer}.{kind}.{target}", alpha)
        scale = mod_alpha / math.sqrt(r) if rslora else mod_alpha / r
        modules[(layer, target)] = (a.to(dtype), (b * scale).to(dtype))
    return LoraWeights(ref.key, modules)


def rank_bucket(rank: int) -> int:
    """Slots are sized by powers of two (min 8) so mixed ranks waste at most half their slot."""
    return max(8, 1 << (rank - 1).bit_length())


class LoraPool:
    """Device slots for adapters of one rank bucket R; slot memory is touched only when written."""

    def __init__(self, cfg: ModelConfig, rank: int, capacity: int, dtype: torch.dtype, device: torch.device):
        self.cfg, self.rank, self.capacity = cfg, rank, capacity
        shapes = cfg.lora_shapes()
        self.a: list[torch.Tensor] = []  # per group: [L, C, in, n*R]
        self.b: list[torch.Tensor] = []  # per group: [L, C, n*R, sum(out)]
        for group in LoraGroup:
            targets = GROUP_TARGETS[group]
            fan_in = shapes[targets[0]][0]
            fan_out = sum(shapes[t][1] for t in targets)
            n = len(targets) * rank
            # empty, not zeros: pages of never-used slots stay uncommitted; `write` zeroes a slot first.
            self.a.append(torch.empty(cfg.num_layers, capacity, fan_in, n, dtype=dtype, device=device))
            self.b.append(torch.empty(cfg.num_layers, capacity, n, fan_out, dtype=dtype, device=device))

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


_grouped_ok = hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, offs_list: list[int]) -> torch.Tensor:
    """Rows [offs[g-1], offs[g]) of x times w[g]: x [n, K], w [G, K, N] -> [n, N]."""
    global _grouped_ok
    if _grouped_ok:
        try:
            return torch._grouped_mm(x, w, offs=offs)
        except (RuntimeError, NotImplementedError):
            _grouped_ok = False  # e.g. fp32 on a CUDA build that only groups bf16: loop from now on
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offs_list):
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


@dataclass
class LoraBatchPart:
    """The rows of one step that use adapters of one pool, sorted by slot.

    When rows spread evenly over a narrow slot range (decode steps), they are padded into a
    [slots, M, K] block and run as two batched GEMMs over the contiguous slot range: far cheaper on
    CPU than grouped GEMMs, whose cost grows with the number of groups. Long prefill chunks would pad
    badly, so those steps use the grouped GEMM.
    """

    pool: LoraPool
    rows: torch.Tensor  # [n] batch rows using this pool, sorted by slot
    offs: torch.Tensor  # [C] int32 cumulative row counts per slot
    offs_list: list[int]
    lo: int  # padded path: slots [lo, hi), M rows each; `padded` is each row's place in [(hi-lo)*M]
    hi: int
    m: int
    padded: torch.Tensor | None

    def shrink_expand(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(x[rows] @ A_slot) @ B_slot for each row; a: [C, K, R], b: [C, R, N] -> [n, N]."""
        xs = x.index_select(0, self.rows)  # [n, K]
        if self.padded is None:
            h = grouped_mm(xs, a, self.offs, self.offs_list)  # [n, R]
            return grouped_mm(h, b, self.offs, self.offs_list)
        g = self.hi - self.lo
        xp = xs.new_zeros(g * self.m, xs.shape[1]).index_copy_(0, self.padded, xs)
        h = torch.bmm(xp.view(g, self.m, -1), a[self.lo:self.hi])  # [G, M, R]
        d = torch.bmm(h, b[self.lo:self.hi])  # [G, M, N]
        return d.view(g * self.m, -1).index_select(0, self.padded)


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
            counts = [0] * pool.capacity
            for slot, _ in items:
                counts[slot] += 1
            offs_list = list(itertools.accumulate(counts))
            lo, hi, m = items[0][0], items[-1][0] + 1, max(counts)
            padded = None
            # Pad only while the padding stays small next to the real rows.
            if (hi - lo) * m <= 2 * len(items) + 32:
                seen: dict[int, int] = {}
                places = []
                for slot, _ in items:
                    places.append((slot - lo) * m + seen.get(slot, 0))
                    seen[slot] = seen.get(slot, 0) + 1
                padded = torch.tensor(places, dtype=torch.long, device=device)
            parts.append(LoraBatchPart(
                pool,
                torch.tensor([row for _, row in items], dtype=torch.long, device=device),
                torch.tensor(offs_list, dtype=torch.int32, device=device),
                offs_list, lo, hi, m, padded,
            ))
        return cls(parts) if parts else None

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows] += (x[rows] @ A_slot) @ B_slot, each row with its own adapter's slot."""
        for p in self.parts:
            d = p.shrink_expand(x, p.pool.a[group][layer], p.pool.b[group][layer])
            out.index_add_(0, p.rows, d)

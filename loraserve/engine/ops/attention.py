"""Attention over the paged KV cache, one backend per engine, each with its own step plan.

- `PagedAttention` (CPU float32, the C kernel): every row, a decode or a prefill token, reads its
  sequence's K/V in place through the block table and attends to its first `lens` positions (causal by
  length: a chunk's own K/V are in the cache before attention runs). No gathered copy.
- `GatherAttention` (CPU without the kernel): decode rows' K/V gathered into a padded block for torch's
  SDPA (its CPU flash kernel), each prefill chunk gathered for a causal SDPA of its own; a soft-capped
  layer's scores are materialised instead (`explicit_attention`: SDPA has no cap).
- `DeviceAttention` (CUDA): the same gathers, decodes through `decode_attention`, which captures into a
  CUDA graph and avoids cuDNN's attention (it re-plans for every context length, ~2 ms of CPU a call).

The runner asks the backend for a step's plan (`plan`), the decoder hands it back with each layer's q
and the layer's `LayerAttention` (scale, logit soft-capping, sliding window), which every backend honours:
the kernel skips the blocks before a window, the gathering backends narrow the plan's masks (`in_window`).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from loraserve.engine.config import ModelConfig
from loraserve.engine.core.scheduler import ScheduledSeq
from loraserve.engine.core.sequence import Sequence
from loraserve.engine.kernels import cpu


@dataclass
class PagedRows:
    """Every row's K/V addressed through its sequence's block table."""

    tables: torch.Tensor  # [T, W] int64 block ids of each row's sequence, zero-padded
    lens: torch.Tensor  # [T] int64 context length, the row's own token included
    block_size: int


@dataclass
class PrefillMeta:
    start: int  # first row of this sequence's new tokens in the flattened batch
    num_new: int
    gather: torch.Tensor  # [ctx] flat KV slots of the whole context, new tokens included
    mask: torch.Tensor  # [num_new, ctx] bool, True = may attend (causal, offset by the cached context)


@dataclass
class GatheredRows:
    """Decode rows [0, num_decode) gathered (flat slots, padded, with a mask); prefill chunks one each."""

    num_decode: int
    decode_gather: torch.Tensor | None  # [Bd, Lmax] flat KV slots, padded
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Lmax] bool
    prefills: list[PrefillMeta]


AttentionPlan = PagedRows | GatheredRows


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends, beside the step's shared plan: what may differ between a model's layers."""

    scale: float  # multiplies q.k: head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) before the softmax
    # A row attends to its last `window` positions only, its own included (kv_pos > q_pos - window, as
    # transformers masks a sliding layer); None: the whole context.
    window: int | None = None

    def __post_init__(self) -> None:
        if self.scale <= 0 or (self.softcap is not None and self.softcap <= 0) \
                or (self.window is not None and self.window < 1):
            raise ValueError(f"invalid attention options {self}")

    @classmethod
    def of_layer(cls, cfg: ModelConfig, layer: int) -> LayerAttention:
        scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
        return cls(scalar ** -0.5, cfg.attn_logit_softcapping,
                   cfg.sliding_window if cfg.is_sliding(layer) else None)


@dataclass(frozen=True)
class StepLayout:
    """Where a step's rows come from, as the runner ordered them: decodes first, then prefill chunks."""

    order: list[ScheduledSeq]
    num_decode: int
    positions: torch.Tensor  # [T] int64 on the host
    block_size: int
    scratch_slot: int  # the KV cache's slot that belongs to no block
    device: torch.device


def block_tables(seqs: Seq[Sequence], length: int, block_size: int) -> torch.Tensor:
    """[n, blocks] int64: each sequence's first ceil(length / block_size) block ids, zero-padded."""
    width = -(-length // block_size)
    rows = [seq.block_table[:width] for seq in seqs]
    return torch.tensor([row + [0] * (width - len(row)) for row in rows], dtype=torch.long)


def flat_slots(seq: Sequence, start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat KV slots of token positions [start, end) of `seq`."""
    pos = torch.arange(start, end)
    table = torch.tensor(seq.block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def decode_gather(seqs: Seq[Sequence], length: int, block_size: int,
                  scratch_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat KV slots of each sequence's context, [n, length] (the scratch slot past its end), and which
    of them are real."""
    tables = block_tables(seqs, length, block_size)
    pos = torch.arange(length)
    gather = tables[:, pos // block_size] * block_size + pos % block_size
    valid = pos.unsqueeze(0) < torch.tensor([seq.num_computed + 1 for seq in seqs]).unsqueeze(1)
    return torch.where(valid, gather, scratch_slot), valid


def in_window(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """`mask` [..., L] bool, each row a prefix (its context), narrowed to each row's last `window`
    positions. Torch operators on the mask alone: no host sync, no shape that depends on the data, so a
    CUDA graph captures it."""
    if window is None:
        return mask
    pos = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (pos >= mask.sum(-1, keepdim=True) - window)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       layer: LayerAttention) -> torch.Tensor:
    """Attention with its scores materialised (in float32), as transformers computes a soft-capped
    layer: scale, cap, mask, softmax. GQA by reshaping q (K/V never repeated).
    q: [B, Hq, n, D]; k, v: [B, Hkv, L, D]; mask: bool, broadcast to [B, 1, n, L] -> [B, Hq, n, D]."""
    b, hq, n, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * n, d), k.transpose(-1, -2)).float() * layer.scale
    if layer.softcap is not None:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    scores = scores.view(b, hkv, g, n, length).masked_fill(~mask.unsqueeze(-3), float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype).view(b, hkv, g * n, length)
    return torch.matmul(probs, v).reshape(b, hq, n, d)


class Attention(Protocol):
    def plan(self, step: StepLayout) -> AttentionPlan: ...

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                 layer: LayerAttention) -> torch.Tensor:
        """q: [T, Hq, D]; k_cache, v_cache: [slots, Hkv, D] -> [T, Hq * D], attending as `layer` says."""
        ...


class PagedAttention:
    def __init__(self, cfg: ModelConfig, kernel: cpu.PagedAttention) -> None:
        self.cfg, self.kernel = cfg, kernel

    def plan(self, step: StepLayout) -> PagedRows:
        lens = step.positions + 1  # causal within a prefill chunk
        tables = block_tables([s.seq for s in step.order], int(lens.max()),
                              step.block_size)  # a row a sequence
        if len(step.order) != lens.shape[0]:  # a prefill chunk's rows: its table for each
            per_row = torch.repeat_interleave(torch.arange(len(step.order)),
                                              torch.tensor([s.num_new for s in step.order]))
            tables = tables[per_row]
        return PagedRows(tables.to(step.device), lens.to(step.device), step.block_size)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                 layer: LayerAttention) -> torch.Tensor:
        if not isinstance(plan, PagedRows):
            raise TypeError("the paged kernel runs a PagedRows plan")
        cfg = self.cfg
        out = torch.empty(q.shape[0], cfg.q_size, dtype=q.dtype, device=q.device)
        self.kernel(q, k_cache, v_cache, plan.tables, plan.lens, plan.block_size,
                    out.view(-1, cfg.num_heads, cfg.head_dim), scale=layer.scale, softcap=layer.softcap,
                    window=layer.window)
        return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     layer: LayerAttention) -> torch.Tensor:
    """One query token per sequence over its gathered K/V (`explicit_attention`).
    q: [Bd, Hq, D]; k, v: [Bd, L, Hkv, D]; mask: [Bd, 1, 1, L] bool -> [Bd, Hq * D]."""
    o = explicit_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), mask, layer)
    return o.reshape(q.shape[0], -1)  # [Bd, Hq, 1, D] -> [Bd, Q]


class GatherAttention:
    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg

    def plan(self, step: StepLayout) -> GatheredRows:
        nd, bs = step.num_decode, step.block_size
        prefills: list[PrefillMeta] = []
        row = 0
        for s in step.order:
            if s.num_new != 1:
                start = s.seq.num_computed
                end = start + s.num_new
                mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1)  # [n, ctx]
                prefills.append(PrefillMeta(row, s.num_new, flat_slots(s.seq, 0, end, bs).to(step.device),
                                            mask.to(step.device)))
            row += s.num_new
        if not nd:
            return GatheredRows(0, None, None, prefills)
        seqs = [s.seq for s in step.order[:nd]]
        lmax = max(seq.num_computed + 1 for seq in seqs)  # context lengths, the new token included
        gather, valid = decode_gather(seqs, lmax, bs, step.scratch_slot)  # [Bd, Lmax]
        return GatheredRows(nd, gather.to(step.device), valid.view(nd, 1, 1, lmax).to(step.device), prefills)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                layer: LayerAttention) -> torch.Tensor:
        """q: [Bd, Hq, D]; k, v: [Bd, L, Hkv, D] -> [Bd, Q]. torch's CPU flash kernel: ~1.5x faster here
        than the explicit form, which a soft-capped layer needs (SDPA has no cap)."""
        if layer.softcap is not None:
            return decode_attention(q, k, v, mask, layer)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=layer.scale, enable_gqa=True)
        return o.reshape(q.shape[0], self.cfg.q_size)  # [Bd, Hq, 1, D] -> [Bd, Q]

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
                 layer: LayerAttention) -> torch.Tensor:
        if not isinstance(plan, GatheredRows):
            raise TypeError("gathered attention runs a GatheredRows plan")
        cfg = self.cfg
        out = torch.empty(q.shape[0], cfg.q_size, dtype=q.dtype, device=q.device)
        nd = plan.num_decode
        if nd:
            assert plan.decode_gather is not None and plan.decode_mask is not None  # plan() sets both
            bd, lmax = plan.decode_gather.shape
            idx = plan.decode_gather.reshape(-1)
            # a float16 cache (EngineConfig.kv_dtype) is widened to q's dtype as it is gathered
            k = k_cache.index_select(0, idx).view(bd, lmax, cfg.num_kv_heads, cfg.head_dim).to(q.dtype)
            v = v_cache.index_select(0, idx).view(bd, lmax, cfg.num_kv_heads, cfg.head_dim).to(q.dtype)
            out[:nd] = self._decode(q[:nd], k, v, in_window(plan.decode_mask, layer.window), layer)
        for p in plan.prefills:
            k = k_cache.index_select(0, p.gather).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hkv, ctx, D]
            v = v_cache.index_select(0, p.gather).transpose(0, 1).unsqueeze(0).to(q.dtype)
            qp = q[p.start:p.start + p.num_new].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            mask = in_window(p.mask, layer.window)
            if layer.softcap is not None:
                o = explicit_attention(qp, k, v, mask, layer)
            else:
                o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=layer.scale,
                                                   enable_gqa=True)
            out[p.start:p.start + p.num_new] = o[0].transpose(0, 1).reshape(p.num_new, cfg.q_size)
        return out


class DeviceAttention(GatherAttention):
    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                layer: LayerAttention) -> torch.Tensor:
        return decode_attention(q, k, v, mask, layer)

"""The CPU LoRA kernel's slot layout (csrc/lora_sgmv.c), built from an adapter's per-layer A and B.

Per group of n targets (fan-in K, fan-outs summing to N) and rank bucket R, one layer of a slot holds
  a: [K * n*R]  the targets' A^T side by side ([K, n*R]), cut into column tiles of `tile`: the tile at
                column c0 is [K, w] row-major at K * c0
  b: [R * N]    target j's B^T ([R, out_j], zero rows past its rank) cut the same way: the tile at output
                column c is [R, w] at R * c
Packing goes a target at a time over all layers: a handful of torch ops an adapter, not a few per
layer, and no detour through the dense layout of `_pack_dense` (about 4x faster; BENCHMARKS.md).
"""

from __future__ import annotations

import torch

# (A [r, K], B [out, r], scale): B's factor (lora_alpha / r) applied when packed, in float32
ScaledPair = tuple[torch.Tensor, torch.Tensor, float]
TargetPairs = list[ScaledPair | None]  # one target's per layer, None where absent (zeros)


def pack_tiles(m: torch.Tensor, tile: int) -> torch.Tensor:
    """[L, rows, cols] -> [L, rows * cols]: column tiles of `tile` (the last may be narrower) one after
    another, each [rows, w] row-major, so the tile at column c starts at rows * c."""
    n_l, rows, cols = m.shape
    full = cols - cols % tile
    parts = [m[:, :, :full].reshape(n_l, rows, full // tile, tile).transpose(1, 2).reshape(n_l, rows * full)]
    if full < cols:
        parts.append(m[:, :, full:].reshape(n_l, rows * (cols - full)))
    return torch.cat(parts, dim=1)


def _stacked(mats: list[torch.Tensor | None], shape: tuple[int, int], rank_dim: int, rank: int,
             dtype: torch.dtype) -> torch.Tensor:
    """[L, *shape] with dim `rank_dim` of `shape` padded to `rank`: one stack when every layer has the
    target at full rank (the usual adapter), else zeros filled layer by layer."""
    if all(m is not None and m.shape[rank_dim] == rank for m in mats):
        return torch.stack([m for m in mats if m is not None]).to(dtype)
    full = list(shape)
    full[rank_dim] = rank
    out = torch.zeros(len(mats), *full, dtype=dtype)
    for layer, m in enumerate(mats):
        if m is not None:
            out[layer].narrow(rank_dim, 0, m.shape[rank_dim]).copy_(m)
    return out


def _scaled_b(pairs: TargetPairs, out: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[L, out, rank]: each layer's B times its scale, computed in float32 and then cast to dtype."""
    b = _stacked([p[1] if p else None for p in pairs], (out, rank), 1, rank, torch.float32)
    scales = torch.tensor([p[2] if p else 0.0 for p in pairs], dtype=torch.float32)
    return b.mul_(scales.view(-1, 1, 1)).to(dtype)


def pack_group(targets: list[TargetPairs], fan_in: int, fan_outs: list[int], rank: int, tile: int,
               a: torch.Tensor, b: torch.Tensor) -> None:
    """One group's packed layout for rank bucket `rank`, written into a [L, K * n*R] and b [L, R * N] (a
    slot's views: rows may lie apart, each row contiguous), in their dtype."""
    n_l, dtype = len(targets[0]), a.dtype
    if rank % tile:  # a tile spans two targets' columns: go through the dense [L, K, n*R] layout
        dense_a, dense_b = _pack_dense(targets, fan_in, fan_outs, rank, tile, dtype)
        a.copy_(dense_a)
        b.copy_(dense_b)
        return
    col = 0
    for j, (pairs, out) in enumerate(zip(targets, fan_outs, strict=True)):
        a_j = _stacked([p[0] if p else None for p in pairs], (rank, fan_in), 0, rank, dtype)  # [L, R, K]
        q = rank // tile
        # target j's columns are its own R // tile tiles: a_t[l, q, k, i] = A_l[q * tile + i, k]
        a_t = a[:, fan_in * j * rank:fan_in * (j + 1) * rank].view(n_l, q, fan_in, tile)
        a_t.copy_(a_j.view(n_l, q, tile, fan_in).transpose(2, 3))
        b_j = _scaled_b(pairs, out, rank, dtype)  # [L, out, R]
        full = out - out % tile
        dst = b[:, rank * col:rank * (col + out)]
        # b_t[l, p, k, i] = B_l[p * tile + i, k]; a narrower last tile [R, w] after the full ones
        dst[:, :rank * full].view(n_l, full // tile, rank, tile).copy_(
            b_j[:, :full].view(n_l, full // tile, tile, rank).transpose(2, 3))
        if full < out:
            dst[:, rank * full:].view(n_l, rank, out - full).copy_(b_j[:, full:].transpose(1, 2))
        col += out


def dense_group(targets: list[TargetPairs], fan_in: int, fan_outs: list[int], rank: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The group unpacked: A^T side by side [L, K, n*R], and each target's scaled B^T [L, R, out_j] (zero
    rows past its rank, zeros where a layer lacks it), built layer by layer on the host."""
    n_l = len(targets[0])
    a = torch.zeros(n_l, fan_in, len(targets) * rank, dtype=dtype)  # [L, K, n*R]
    bs = [torch.zeros(n_l, rank, fo, dtype=dtype) for fo in fan_outs]  # [L, R, out_j]
    for j, pairs in enumerate(targets):
        for layer, pair in enumerate(pairs):
            if pair is not None:
                wa, wb, scale = pair
                r = wa.shape[0]
                a[layer, :, j * rank:j * rank + r] = wa.t()
                bs[j][layer, :r] = wb.t().float() * scale
    return a, bs


def _pack_dense(targets: list[TargetPairs], fan_in: int, fan_outs: list[int], rank: int, tile: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a, bs = dense_group(targets, fan_in, fan_outs, rank, dtype)
    return pack_tiles(a, tile), torch.cat([pack_tiles(b, tile) for b in bs], dim=1)

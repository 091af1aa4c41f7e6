"""A Llama-family decoder (Llama 2/3, Mistral, SmolLM2) over a paged KV cache, with batched multi-LoRA.

Tokens of many sequences are flattened into one row each (`T` rows). Projections run once for the whole
batch; attention reads each sequence's K/V through its block table; each LoRA-carrying row gets its own
adapter's delta through `LoraBatch` (grouped shrink/expand, never a loop over requests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loraserve.engine.config import ModelConfig
from loraserve.engine.kernels.cpu import LayerGlue, LinearKernel, PagedAttention
from loraserve.engine.lora.batch import LoraBatch
from loraserve.engine.lora.pool import LoraGroup
from loraserve.engine.lora.static import StaticLora
from loraserve.engine.ops.linear import DUAL_LAYOUT_MAX_BYTES, Layout, Linear


@dataclass
class PrefillMeta:
    start: int  # first row of this sequence's new tokens in the flattened batch
    num_new: int
    gather: torch.Tensor  # [ctx] flat KV slots of the whole context, new tokens included
    mask: torch.Tensor  # [num_new, ctx] bool, True = may attend (causal, offset by the cached context)


@dataclass
class PagedRows:
    """Every row's K/V addressed through its sequence's block table, for the paged attention kernel (no
    gather): a decode row, or one token of a prefill chunk, which attends to its first `lens` positions
    (causal attention by length; the chunk's own K/V are in the cache before attention runs)."""

    tables: torch.Tensor  # [T, W] int64 block ids of each row's sequence, zero-padded
    lens: torch.Tensor  # [T] int64 context length, the row's own token included
    block_size: int


@dataclass
class BatchMeta:
    """Everything the forward pass needs about one step, built by the model runner; no hidden globals."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token writes
    num_decode: int  # rows [0, num_decode) are single-token decodes, one per sequence
    # Attention's K/V: `paged` (block tables, every row, the CPU kernel), else decode rows gathered (flat
    # slots, padded, with a mask) and each prefill chunk gathered for SDPA (`prefills`).
    decode_gather: torch.Tensor | None  # [Bd, Lmax] flat KV slots, padded
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, Lmax] bool
    prefills: list[PrefillMeta]  # empty when `paged` covers every row
    logits_indices: torch.Tensor  # [S] rows whose next token is sampled
    lora: LoraBatch | StaticLora | None = None
    paged: PagedRows | None = None


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        # k, v: [L, num_blocks * block_size + 1, Hkv, D]; a flat slot index addresses one token's K/V. The
        # last slot belongs to no block: padding rows of a static (CUDA-graph) batch write and read it.
        self.scratch_slot = num_slots
        shape = (cfg.num_layers, num_slots + 1, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: Linear  # H -> Q + 2KV: q, k, v fused so the batch reads one matrix
    o: Linear  # Q -> H
    mlp_norm: torch.Tensor  # [H]
    gate_up: Linear  # H -> 2I
    down: Linear  # I -> H


def rope_tables(cfg: ModelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_pos, D] in HF's rotate_half layout (the two halves repeat the frequencies)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def _llama3_scale(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1's long-context scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(is_mid, mid, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos/sin: [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     cfg: ModelConfig) -> torch.Tensor:
    """One query token per sequence over its gathered K/V, GQA by reshaping q (K/V never repeated).

    Used on CUDA: it captures into a CUDA graph, and it avoids cuDNN's attention, which spends ~2 ms of
    CPU per call (H100, torch.profiler: 1.9 ms x 32 layers of a 67 ms Llama-2-7B decode step).
    q: [Bd, Hq, D]; k, v: [Bd, L, Hkv, D]; mask: [Bd, 1, 1, L] bool -> [Bd, Q].
    """
    bd = q.shape[0]
    qg = q.reshape(bd, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)  # [Bd, Hkv, G, D]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * cfg.head_dim ** -0.5  # [Bd, Hkv, G, L]
    probs = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v.permute(0, 2, 1, 3)).reshape(bd, cfg.q_size)  # [Bd, Hkv, G, D] -> [Bd, Q]


class Llama:
    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device, paged_attention: PagedAttention | None = None,
                 linear_kernel: LinearKernel | None = None, layer_glue: LayerGlue | None = None) -> None:
        self.cfg = cfg
        self.device = device
        # CPU float32 only (cpu_kernels.py): attention, decode and prefill, straight from the paged cache
        # (None: gather + SDPA), the projections (None: MKL, with the layouts below), residual + RMSNorm,
        # RoPE + KV write and silu * up fused (None: torch's operators).
        if ((paged_attention is not None or linear_kernel is not None or layer_glue is not None)
                and (device.type != "cpu" or dtype != torch.float32)):
            raise ValueError("the CPU kernels run on the CPU in float32 only")
        self.paged_attention = paged_attention
        self.layer_glue = layer_glue

        def take(name: str) -> torch.Tensor:
            return state.pop(name).to(device=device, dtype=dtype)

        # Layouts by device (see linear.py): CPU without the linear kernel keeps q/k/v and o as [in, out],
        # gate/up and lm_head in both layouts while the copies fit DUAL_LAYOUT_MAX_BYTES; with it every
        # weight is kept packed for it alone (Linear.of); on CUDA every weight is [out, in] alone.
        mkl = device.type == "cpu" and linear_kernel is None
        h, inter = cfg.hidden_size, cfg.intermediate_size
        dual_bytes = (cfg.num_layers * 2 * inter * h + cfg.vocab_size * h) * dtype.itemsize
        dual = Layout.BOTH if mkl and dual_bytes <= DUAL_LAYOUT_MAX_BYTES else Layout.OUT_IN
        in_out = Layout.IN_OUT if mkl else Layout.OUT_IN
        self.dtype = dtype
        self.embed: torch.Tensor | None = take("model.embed_tokens.weight")  # [V, H]
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"),
                qkv=Linear.of(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]), in_out, linear_kernel),
                o=Linear.of(take(p + "self_attn.o_proj.weight"), in_out, linear_kernel),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=Linear.of(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                                  dual, linear_kernel),
                down=Linear.of(take(p + "mlp.down_proj.weight"), Layout.OUT_IN, linear_kernel),
            ))
        self.norm = take("model.norm.weight")
        head = state.pop("lm_head.weight", None)
        if head is None or cfg.tie_word_embeddings:
            self.lm_head = Linear.of(self.embed, dual, linear_kernel)
            # One copy of a tied matrix: the head's [out, in], or none when the kernel packed it (the
            # embedding rows are then read from the panels).
            self.embed = self.lm_head.w
        else:
            self.lm_head = Linear.of(head.to(device, dtype), dual, linear_kernel)
        self.cos, self.sin = rope_tables(cfg, device)
        self.cos, self.sin = self.cos.to(dtype), self.sin.to(dtype)

    @torch.inference_mode()
    def forward(self, batch: BatchMeta, kv: KVCache) -> torch.Tensor:
        """Logits [S, V] (float32) for the rows in `batch.logits_indices`."""
        cfg = self.cfg
        glue = self.layer_glue
        ids = batch.input_ids
        # [T, H], this pass's own (a gather copies): the fused norm adds into it in place
        h = self.embed[ids] if self.embed is not None else self.lm_head.rows(ids)
        cos, sin = self.cos, self.sin  # [max_pos, D] tables, read in place by the fused kernel
        if glue is None:
            cos, sin = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)  # [T, 1, D]
        delta: torch.Tensor | None = None  # the previous layer's MLP output, added into h by the next norm
        for i, lw in enumerate(self.layers):
            h, x = self._add_norm(h, delta, lw.attn_norm)
            qkv = lw.qkv(x)  # [T, Q + 2KV]
            if batch.lora is not None:
                batch.lora.apply(i, LoraGroup.QKV, x, qkv)
            if glue is not None:
                q = glue.rope_store(qkv, cfg.num_heads, cfg.num_kv_heads, cos, sin, batch.positions,
                                    batch.slot_mapping, kv.k[i], kv.v[i])  # [T, Hq, D]
            else:
                q, k, v = torch.split(qkv, [cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
                q = apply_rope(q.view(-1, cfg.num_heads, cfg.head_dim), cos, sin)  # [T, Hq, D]
                k = apply_rope(k.view(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)  # [T, Hkv, D]
                kv.k[i].index_copy_(0, batch.slot_mapping, k)
                kv.v[i].index_copy_(0, batch.slot_mapping, v.view(-1, cfg.num_kv_heads, cfg.head_dim))
            attn = self._attention(q, kv.k[i], kv.v[i], batch)  # [T, Q]
            o = lw.o(attn)
            if batch.lora is not None:
                batch.lora.apply(i, LoraGroup.OUT, attn, o)
            h, x = self._add_norm(h, o, lw.mlp_norm)
            gu = lw.gate_up(x)  # [T, 2I]
            if batch.lora is not None:
                batch.lora.apply(i, LoraGroup.GATE_UP, x, gu)
            if glue is not None:
                act = glue.silu_mul(gu)  # [T, I]
            else:
                gate, up = gu.chunk(2, dim=-1)
                act = F.silu(gate) * up
            delta = lw.down(act)
            if batch.lora is not None:
                batch.lora.apply(i, LoraGroup.DOWN, act, delta)
        if delta is not None:
            h = h + delta
        h = h.index_select(0, batch.logits_indices)
        h = F.rms_norm(h, (cfg.hidden_size,), self.norm, cfg.rms_norm_eps)
        return self.lm_head(h).float()  # [S, V]

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                  w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rmsnorm(h + delta) * w); the fused kernel adds into h in place."""
        if self.layer_glue is not None:
            return h, self.layer_glue.add_rms_norm(h, delta, w, self.cfg.rms_norm_eps)
        if delta is not None:
            h = h + delta
        return h, F.rms_norm(h, (self.cfg.hidden_size,), w, self.cfg.rms_norm_eps)

    def _attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   batch: BatchMeta) -> torch.Tensor:
        cfg = self.cfg
        out = torch.empty(q.shape[0], cfg.q_size, dtype=q.dtype, device=q.device)
        nd = batch.num_decode
        if batch.paged is not None:  # every row, decodes and prefill tokens alike
            assert self.paged_attention is not None  # the runner builds `paged` only when the model has it
            pd = batch.paged
            self.paged_attention(q, k_cache, v_cache, pd.tables, pd.lens, pd.block_size,
                                 out.view(-1, cfg.num_heads, cfg.head_dim))
        elif nd:
            assert batch.decode_gather is not None and batch.decode_mask is not None
            bd, lmax = batch.decode_gather.shape
            idx = batch.decode_gather.reshape(-1)
            k = k_cache.index_select(0, idx).view(bd, lmax, cfg.num_kv_heads, cfg.head_dim)
            v = v_cache.index_select(0, idx).view(bd, lmax, cfg.num_kv_heads, cfg.head_dim)
            if q.device.type == "cpu":  # torch's CPU flash kernel: ~1.5x faster than the explicit form here
                qd = q[:nd].unsqueeze(2)  # [Bd, Hq, 1, D]
                o = F.scaled_dot_product_attention(
                    qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=batch.decode_mask, enable_gqa=True)
                out[:nd] = o.reshape(nd, cfg.q_size)  # o: [Bd, Hq, 1, D]
            else:
                out[:nd] = decode_attention(q[:nd], k, v, batch.decode_mask, cfg)
        for p in batch.prefills:
            k = k_cache.index_select(0, p.gather).transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            v = v_cache.index_select(0, p.gather).transpose(0, 1).unsqueeze(0)
            qp = q[p.start:p.start + p.num_new].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask, enable_gqa=True)
            out[p.start:p.start + p.num_new] = o[0].transpose(0, 1).reshape(p.num_new, cfg.q_size)
        return out

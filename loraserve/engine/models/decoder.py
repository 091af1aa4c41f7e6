"""The decoder: pre-norm layers (Llama 2/3, Mistral, SmolLM2, Gemma 1/2/3, Qwen2/3) over a paged KV cache,
with batched multi-LoRA, in the shape its `Family` describes.

Tokens of many sequences are flattened into one row each (`T` rows). Projections run once for the whole
batch; attention reads each sequence's K/V through the plan its backend made; each LoRA-carrying row gets
its own adapter's delta through the step's `lora` (grouped shrink/expand, never a loop over requests).
How each op is computed (C kernels, torch on the CPU, CUDA) was chosen once, in `ops`: nothing here
branches on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.engine.config import ModelConfig
from loraserve.engine.lora.pool import LoraGroup
from loraserve.engine.models.family import Family, family_of
from loraserve.engine.models.rope import rope_tables
from loraserve.engine.models.step import BatchMeta, KVCache
from loraserve.engine.ops.attention import LayerAttention
from loraserve.engine.ops.linear import Projection, Role
from loraserve.engine.ops.select import Ops
from loraserve.engine.weights.hf import StateDict
from loraserve.engine.weights.quant import QuantTensor, Weight, as_float, fuse


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: Projection  # H -> Q + 2KV: q, k, v fused so the batch reads one matrix
    qkv_bias: torch.Tensor | None  # [Q + 2KV] where the family has biases
    q_norm: torch.Tensor | None  # [D], per head before RoPE, where the family norms q and k
    k_norm: torch.Tensor | None  # [D]
    attention: LayerAttention  # scale, soft-capping, sliding window
    o: Projection  # Q -> H
    post_attn_norm: torch.Tensor | None  # [H], on the attention output (sandwich-norm families)
    mlp_norm: torch.Tensor  # [H]
    gate_up: Projection  # H -> 2I
    down: Projection  # I -> H
    post_mlp_norm: torch.Tensor | None  # [H], on the MLP output (sandwich-norm families)


class Decoder:
    def __init__(self, cfg: ModelConfig, state: StateDict, dtype: torch.dtype,
                 device: torch.device, ops: Ops) -> None:
        self.cfg, self.dtype, self.device, self.ops = cfg, dtype, device, ops
        self.family: Family = family_of(cfg.architecture)
        fam, make = self.family, ops.projections.make

        def weight(name: str) -> torch.Tensor | QuantTensor:  # GGUF blocks stay quantized
            w = state.pop(name)
            return w if isinstance(w, QuantTensor) else as_float(w, dtype).to(device=device, dtype=dtype)

        def take(name: str) -> torch.Tensor:
            return as_float(state.pop(name), dtype).to(device=device, dtype=dtype)

        def fused(names: list[str]) -> Weight:
            return fuse([weight(n) for n in names], dtype)

        def norm(name: str) -> torch.Tensor:
            return take(name) + fam.norm_offset if fam.norm_offset else take(name)

        def norm_if(present: bool, name: str) -> torch.Tensor | None:
            return norm(name) if present else None

        # [V, H]; indexing rows of quantized blocks dequantizes just those rows
        self.embed: torch.Tensor | QuantTensor | None = weight("model.embed_tokens.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            attn = [f"{p}self_attn.{n}_proj" for n in "qkv"]
            sandwich = fam.sandwich_norms
            self.layers.append(LayerWeights(
                attn_norm=norm(p + "input_layernorm.weight"),
                qkv=make(fused([n + ".weight" for n in attn]), Role.ATTENTION),
                qkv_bias=torch.cat([take(n + ".bias") for n in attn]) if fam.qkv_bias else None,
                q_norm=norm_if(fam.qk_norm, p + "self_attn.q_norm.weight"),
                k_norm=norm_if(fam.qk_norm, p + "self_attn.k_norm.weight"),
                attention=LayerAttention.of_layer(cfg, i),
                o=make(weight(p + "self_attn.o_proj.weight"), Role.ATTENTION),
                # Sandwich families name the MLP's input norm pre_feedforward_layernorm, and their
                # post_attention_layernorm norms the attention output.
                post_attn_norm=norm_if(sandwich, p + "post_attention_layernorm.weight"),
                mlp_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich
                                   else "post_attention_layernorm.weight")),
                gate_up=make(fused([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]), Role.WIDE),
                down=make(weight(p + "mlp.down_proj.weight"), Role.DOWN),
                post_mlp_norm=norm_if(sandwich, p + "post_feedforward_layernorm.weight"),
            ))
        self.norm = norm("model.norm.weight")
        if "lm_head.weight" not in state or cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            self.lm_head = make(self.embed, Role.WIDE)
            # One copy of a tied matrix: the embedding rows are read through the head (`rows`), from
            # its [out, in] weight or its packed panels.
            self.embed = None
        else:
            self.lm_head = make(weight("lm_head.weight"), Role.WIDE)
        self.embed_scale = math.sqrt(cfg.hidden_size) if fam.embed_scale else None
        cos, sin = rope_tables(cfg, device)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)  # [max_pos, D]
        # Sliding layers with a RoPE base of their own (Gemma 3) read a second table.
        self.local_rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.rope_local_theta is not None:
            lcos, lsin = rope_tables(cfg, device, local=True)
            self.local_rope = lcos.to(dtype), lsin.to(dtype)

    @torch.inference_mode()
    def forward(self, batch: BatchMeta, kv: KVCache) -> torch.Tensor:
        """Logits [S, V] (float32) for the rows in `batch.logits_indices`."""
        cfg, glue, lora, eps = self.cfg, self.ops.glue, batch.lora, self.cfg.rms_norm_eps
        ids = batch.input_ids
        # [T, H], this pass's own (a gather copies): the fused norm adds into it in place
        h = self.embed[ids] if self.embed is not None else self.lm_head.rows(ids)
        if self.embed_scale is not None:
            h *= self.embed_scale
        rope = glue.rope(self.cos, self.sin, batch.positions)
        local_rope = rope if self.local_rope is None else glue.rope(*self.local_rope, batch.positions)
        delta: torch.Tensor | None = None  # the previous layer's MLP output, added into h by the next norm
        for i, (lw, (k_cache, v_cache)) in enumerate(zip(self.layers, kv.layers, strict=True)):
            h, x = glue.add_rms_norm(h, delta, lw.attn_norm, eps)
            qkv = lw.qkv(x)  # [T, Q + 2KV]
            if lw.qkv_bias is not None:
                qkv += lw.qkv_bias
            if lora is not None:
                lora.apply(i, LoraGroup.QKV, x, qkv)
            if lw.q_norm is not None and lw.k_norm is not None:
                self._qk_norm(qkv, lw.q_norm, lw.k_norm)
            q = glue.rope_store(qkv, cfg.num_heads, cfg.num_kv_heads,
                                local_rope if lw.attention.window is not None else rope,
                                batch.slot_mapping, k_cache, v_cache)  # [T, Hq, D]
            attn = self.ops.attention(q, k_cache, v_cache, batch.attention, lw.attention)  # [T, Q]
            o = lw.o(attn)
            if lora is not None:
                lora.apply(i, LoraGroup.OUT, attn, o)
            if lw.post_attn_norm is not None:
                o = F.rms_norm(o, (cfg.hidden_size,), lw.post_attn_norm, eps)
            h, x = glue.add_rms_norm(h, o, lw.mlp_norm, eps)
            gu = lw.gate_up(x)  # [T, 2I]
            if lora is not None:
                lora.apply(i, LoraGroup.GATE_UP, x, gu)
            act = glue.act_mul(gu, self.family.activation)  # [T, I]
            delta = lw.down(act)
            if lora is not None:
                lora.apply(i, LoraGroup.DOWN, act, delta)
            if lw.post_mlp_norm is not None:
                delta = F.rms_norm(delta, (cfg.hidden_size,), lw.post_mlp_norm, eps)
        if delta is not None:
            h = h + delta
        h = h.index_select(0, batch.logits_indices)
        h = F.rms_norm(h, (cfg.hidden_size,), self.norm, eps)
        logits = self.lm_head(h).float()  # [S, V]
        if cfg.final_logit_softcapping is not None:
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _qk_norm(self, qkv: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor) -> None:
        """RMSNorm of each q and k head of qkv, in place, before RoPE (Gemma 3, Qwen3)."""
        cfg = self.cfg
        d, t = cfg.head_dim, qkv.shape[0]
        q = qkv[:, :cfg.q_size].view(t, cfg.num_heads, d)  # [T, Hq, D], a view into qkv
        k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].view(t, cfg.num_kv_heads, d)
        q.copy_(F.rms_norm(q, (d,), q_norm, cfg.rms_norm_eps))
        k.copy_(F.rms_norm(k, (d,), k_norm, cfg.rms_norm_eps))

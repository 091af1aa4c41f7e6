"""A decoder layer's element-wise work between the projections: residual add + RMSNorm, RoPE + the K/V
cache write, and the MLP's activation times its up projection.

`KernelGlue` (CPU float32) does each in one C call (kernels/csrc/layer_glue.c): ~25 torch operators a
layer cost a few microseconds of dispatch each whatever the batch. `TorchGlue` is the same math in torch's
operators, for every other device and dtype.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from loraserve.engine.kernels.layer_glue import LayerGlue


class Activation(enum.Enum):
    SILU = enum.auto()  # SwiGLU: Llama, Mistral, Qwen2
    GELU_TANH = enum.auto()  # GeGLU with tanh-approximated GELU: Gemma


@dataclass
class Rope:
    """A step's RoPE inputs, prepared once for all layers: the [max_pos, D] tables and the positions for
    the kernel (it reads the tables in place), or the rows already gathered ([T, 1, D])."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # [T] int64


class Glue(Protocol):
    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, rmsnorm(h + delta) * w); h may be updated in place."""
        ...

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> Rope: ...

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, rope: Rope, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """RoPE on qkv's q and k heads; k and v written into their cache slots; q returned as [T, Hq, D].
        qkv: [T, (Hq + 2 Hkv) D]; slots: [T] int64; k_cache, v_cache: [slots, Hkv, D]."""
        ...

    def act_mul(self, gu: torch.Tensor, act: Activation) -> torch.Tensor:
        """act(gate) * up from gu = [gate | up]: [T, 2I] -> [T, I]."""
        ...

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy tokens: each row's index of its largest logit, as torch.argmax(dim=-1): [S, V] -> [S]."""
        ...


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos/sin: [T, 1, D], HF's rotate_half layout
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's index of its largest logit, by torch (any device): [S, V] -> [S]."""
    return logits.argmax(dim=-1)


class TorchGlue:
    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            h = h + delta
        return h, F.rms_norm(h, (h.shape[-1],), w, eps)

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> Rope:
        return Rope(cos[positions].unsqueeze(1), sin[positions].unsqueeze(1), positions)  # [T, 1, D]

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, rope: Rope, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        d = k_cache.shape[-1]
        q, k, v = torch.split(qkv, [heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = apply_rope(q.view(-1, heads, d), rope.cos, rope.sin)  # [T, Hq, D]
        k = apply_rope(k.view(-1, kv_heads, d), rope.cos, rope.sin)  # [T, Hkv, D]
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))  # a float16 cache: rounded to nearest even
        v_cache.index_copy_(0, slots, v.view(-1, kv_heads, d).to(v_cache.dtype))
        return q

    def act_mul(self, gu: torch.Tensor, act: Activation) -> torch.Tensor:
        gate, up = gu.chunk(2, dim=-1)
        if act is Activation.GELU_TANH:
            return F.gelu(gate, approximate="tanh") * up
        return F.silu(gate) * up

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch_argmax(logits)


class KernelGlue(TorchGlue):
    """Each step in one C call (kernels/csrc/layer_glue.c)."""

    def __init__(self, kernel: LayerGlue) -> None:
        self.kernel = kernel

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return h, self.kernel.add_rms_norm(h, delta, w, eps)

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> Rope:
        return Rope(cos, sin, positions)  # read in place by the kernel

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, rope: Rope, slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return self.kernel.rope_store(qkv, heads, kv_heads, rope.cos, rope.sin, rope.positions, slots,
                                      k_cache, v_cache)

    def act_mul(self, gu: torch.Tensor, act: Activation) -> torch.Tensor:
        match act:
            case Activation.SILU:
                return self.kernel.silu_mul(gu)
            case Activation.GELU_TANH:
                return self.kernel.gelu_tanh_mul(gu)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return self.kernel.argmax(logits if logits.stride(-1) == 1 else logits.contiguous())

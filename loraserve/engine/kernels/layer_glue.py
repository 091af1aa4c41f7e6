"""A decoder layer's element-wise work in C (csrc/layer_glue.c).

Why: between the projections, residual adds, RMSNorm, RoPE, the KV cache writes and the MLP's activation *
up are ~25 torch operators a layer, a few microseconds of dispatch each whatever the batch; the library
does them in four calls, and a greedy step's argmax over the logits in one (torch's argmax is not
vectorized on the CPU). Built and cached like the other kernels (build.py); None where it cannot be built.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from loraserve.engine.kernels.args import cpu_float32, kv_half
from loraserve.engine.kernels.build import load_kernel


class LayerGlue:
    """A decoder layer's element-wise work in few calls: residual add + RMSNorm, RoPE + KV cache write,
    silu(gate) * up and gelu_tanh(gate) * up; and a greedy step's argmax over the logits."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._norm = lib.add_rms_norm
        self._norm.argtypes = [p, i, p, i, i, i, p, f, p, i, ctypes.c_int]
        self._norm.restype = None
        self._rope = lib.rope_store
        self._rope.argtypes = [p, i, i, i, i, i, p, p, i, p, p, i, p, p, p, ctypes.c_int, ctypes.c_int]
        self._rope.restype = ctypes.c_int
        for fn in (lib.silu_mul, lib.gelu_tanh_mul):  # the same arguments
            fn.argtypes = [p, i, i, i, p, i, ctypes.c_int]
            fn.restype = None
        self._silu_mul, self._gelu_tanh_mul = lib.silu_mul, lib.gelu_tanh_mul
        self._argmax = lib.row_argmax
        self._argmax.argtypes = [p, i, i, i, p, ctypes.c_int]
        self._argmax.restype = None

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's index of its largest value (the first of equal ones; a NaN counts as the largest), as
        torch.argmax(x, dim=-1): x [T, V], V >= 1 -> int64 [T]."""
        if not cpu_float32(x) or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] == 0:
            raise ValueError("row_argmax takes a float32 CPU [T, V] tensor, V >= 1, with contiguous rows")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr(),
                     torch.get_num_threads())
        return out

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """h += delta (in place, when given), then rmsnorm(h) * w as a new [T, H] tensor."""
        t, hid = h.shape
        for x in (h, delta) if delta is not None else (h,):
            if not cpu_float32(x) or x.stride(1) != 1:
                raise ValueError("add_rms_norm takes float32 CPU tensors with contiguous rows")
        if (delta is not None and delta.shape != h.shape) or w.shape != (hid,):
            raise ValueError("add_rms_norm: inconsistent shapes")
        out = torch.empty(t, hid)
        self._norm(h.data_ptr(), h.stride(0), 0 if delta is None else delta.data_ptr(),
                   0 if delta is None else delta.stride(0), t, hid, w.data_ptr(), eps, out.data_ptr(), hid,
                   torch.get_num_threads())
        return out

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from gu = [gate | up]: [T, 2I] -> a new [T, I]."""
        return self._act_mul(self._silu_mul, "silu_mul", gu)

    def gelu_tanh_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """gelu(gate, approximate="tanh") * up from gu = [gate | up]: [T, 2I] -> a new [T, I]."""
        return self._act_mul(self._gelu_tanh_mul, "gelu_tanh_mul", gu)

    @staticmethod
    def _act_mul(fn: Callable[..., None], name: str, gu: torch.Tensor) -> torch.Tensor:
        t, two_i = gu.shape
        if not cpu_float32(gu) or gu.stride(1) != 1 or two_i % 2:
            raise ValueError(f"{name} takes a float32 CPU [T, 2I] tensor with contiguous rows")
        act = torch.empty(t, two_i // 2)
        fn(gu.data_ptr(), gu.stride(0), t, two_i // 2, act.data_ptr(), two_i // 2, torch.get_num_threads())
        return act

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> torch.Tensor:
        """RoPE on qkv's q and k heads; k and v written into their cache slots; q returned as [T, Hq, D].
        qkv: [T, (Hq + 2 Hkv) D]; cos, sin: [max_pos, D]; positions, slots: [T] int64; k_cache, v_cache:
        [slots, Hkv, D]. Positions and slots outside the tables raise IndexError before anything is
        written."""
        t = qkv.shape[0]
        d = cos.shape[1]
        if not cpu_float32(qkv) or qkv.stride(1) != 1 or qkv.shape[1] != (heads + 2 * kv_heads) * d:
            raise ValueError("rope_store takes a float32 CPU [T, (Hq + 2 Hkv) D] qkv with contiguous rows")
        for x in (cos, sin):
            if not cpu_float32(x) or not x.is_contiguous():
                raise ValueError("rope_store takes contiguous float32 CPU tables")
        half = kv_half(k_cache, v_cache, "rope_store")
        if positions.shape != (t,) or slots.shape != (t,) or positions.dtype != torch.int64 \
                or slots.dtype != torch.int64 or not positions.is_contiguous() or not slots.is_contiguous() \
                or k_cache.shape[1:] != (kv_heads, d) or v_cache.shape != k_cache.shape \
                or sin.shape != cos.shape:
            raise ValueError("rope_store: inconsistent positions, slots or cache")
        q = torch.empty(t, heads, d)
        if self._rope(qkv.data_ptr(), qkv.stride(0), t, heads, kv_heads, d, cos.data_ptr(), sin.data_ptr(),
                      cos.shape[0], positions.data_ptr(), slots.data_ptr(), k_cache.shape[0], q.data_ptr(),
                      k_cache.data_ptr(), v_cache.data_ptr(), half, torch.get_num_threads()):
            raise IndexError("rope_store: a position or KV slot is outside its table")
        return q


@functools.cache
def load_layer_glue() -> LayerGlue | None:
    return load_kernel("layer_glue", LayerGlue)

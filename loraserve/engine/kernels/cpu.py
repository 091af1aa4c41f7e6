"""Native CPU kernels: small C files in csrc/, built at first use with the machine's C compiler.

Why: decode attention through torch on the CPU first gathers every sequence's K/V into a padded copy
(`index_select`, ~6 MB a layer at batch 32 for SmolLM2) that `scaled_dot_product_attention` then reads
again. `paged_decode_attention` reads each K/V row once, in place, through the block table (see
csrc/paged_attention.c), which makes decode attention memory-bound on the cache alone. Multi-LoRA
through torch gathers rows into padded blocks and scatters them back, and reads block-diagonal B
matrices; `lora_sgmv` (csrc/lora_sgmv.c) streams each adapter's packed weights once per step. MKL runs
this CPU's projections well under its FMA peak (a one-row step reads the weights at half the memory
bandwidth, a 32-row step computes at about half the peak); `linear_forward` (csrc/linear.c), over
weights packed in column panels, runs them 2.7-4.4x faster, from one row to a prefill. Between the
projections, residual adds, RMSNorm, RoPE, the KV cache writes and the MLP's activation * up are ~25 torch
operators a layer, a few microseconds of dispatch each whatever the batch; csrc/layer_glue.c does them
in four calls (its wrapper: layer_glue.py; the quantized projections': qlinear.py).

Each is built at first use and cached (build.py); no compiler, or a failed build: the loaders return
None and the engine keeps torch's paths.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from loraserve.engine.kernels.args import cpu_float32, kv_half
from loraserve.engine.kernels.build import load_kernel
from loraserve.engine.kernels.huge_pages import weight_buffer


class PagedAttention:
    """Attention on the CPU, one query row at a time (a decode, or a prefill token: causal by length), reading
    K/V in place through block tables (float32 q and out; float32 or float16 caches)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.tile = int(lib.paged_attention_tile())  # scores a vector tile holds; 0: the scalar build
        fn = lib.paged_decode_attention
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        fn.argtypes = [p, p, p, i, p, i, p, i, i, i, i, i, f, f, i, ctypes.c_int, p, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, out: torch.Tensor, *, scale: float,
                 softcap: float | None, window: int | None) -> None:
        """out[b] = softmax(scores) V_b over sequence b's last min(lens[b], window) of its first lens[b]
        positions (all lens[b] without a window), scores = scale * q[b] K_b^T, then
        softcap * tanh(scores / softcap) with a softcap.
        q, out: [B, Hq, D]; k_cache, v_cache: [slots, Hkv, D]; tables: [B, W] int64; lens: [B] int64.
        Lengths beyond a table, or block ids beyond the cache among those read, raise IndexError before
        anything is read."""
        b, hq, d = q.shape
        hkv = k_cache.shape[1]
        for t in (q, out):
            if not cpu_float32(t) or not t.is_contiguous():
                raise ValueError("paged_decode_attention takes contiguous float32 CPU q and out")
        half = kv_half(k_cache, v_cache, "paged_decode_attention")
        if tables.dtype != torch.int64 or lens.dtype != torch.int64 or not tables.is_contiguous() \
                or not lens.is_contiguous():
            raise ValueError("block tables and lengths must be contiguous int64")
        if hq % hkv or out.shape != q.shape or tables.shape[0] != b or lens.shape != (b,) \
                or k_cache.shape[2] != d or v_cache.shape != k_cache.shape:
            raise ValueError("paged_decode_attention: inconsistent shapes")
        if not scale > 0 or (softcap is not None and not softcap > 0) or (window is not None and window < 1):
            raise ValueError(f"paged_decode_attention: invalid scale {scale}, softcap {softcap} or "
                             f"window {window}")
        failed = self._fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
                          tables.data_ptr(), tables.shape[1], lens.data_ptr(), b, hq, hkv, d, block_size,
                          scale, softcap or 0.0, window or 0, half, out.data_ptr(), torch.get_num_threads())
        if failed == 2:
            raise IndexError("paged_decode_attention: a length or block id is outside the tables "
                             "or the cache")
        if failed:
            raise MemoryError("paged_decode_attention could not allocate its scratch buffers")


class LoraSgmv:
    """out[row] += (x[row] @ A_slot) @ B_slot for segments of rows sharing a slot, over packed weights."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.tile = int(lib.lora_sgmv_tile())  # the packed layout's column tile (LoraPool packs with it)
        self.kpart = int(lib.lora_sgmv_kpart())  # rows of A a shrink task sums: h holds a partial per part
        p, i = ctypes.c_void_p, ctypes.c_int64
        # float32 weights, and float16 ones (widened as they are read): the same arguments
        for fn in (lib.lora_sgmv, lib.lora_sgmv_f16):
            fn.argtypes = [p, i, p, i, p, p, i, i, i, i, p, i, p, p, ctypes.c_int]
            fn.restype = None
        self._fn, self._fn16 = lib.lora_sgmv, lib.lora_sgmv_f16

    def h_width(self, fan_in: int, width: int) -> int:
        """Floats a row of the scratch h needs for `width` shrink outputs over `fan_in` inputs."""
        return -(-fan_in // self.kpart) * width

    def __call__(self, x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rank: int,
                 cols: torch.Tensor, plan: torch.Tensor, nseg: int, max_row: int, h: torch.Tensor) -> None:
        """x: [T, K]; out: [T, N]. The rest belongs to a packed LoraPool and its step plan, which check them
        once (not per call, 120 calls a step): a: [C, K * n * rank] and b: [C, rank * N] one layer's slots
        (both float32 or both float16);
        cols: [n + 1] int64 column offsets of the n targets; plan: int64 [nseg slots | nseg + 1 starts |
        rows] with slots < C and rows <= max_row; h: float32 scratch [rows, >= h_width(K, n * rank)]."""
        n = cols.shape[0] - 1
        k = x.shape[1]
        for t in (x, out):
            if not cpu_float32(t) or t.stride(1) != 1:
                raise ValueError("lora_sgmv takes float32 CPU tensors with contiguous rows")
        if (max_row >= min(x.shape[0], out.shape[0]) or a.shape[1] != k * n * rank
                or b.shape[1] != rank * out.shape[1] or h.shape[1] < self.h_width(k, n * rank)):
            raise ValueError("lora_sgmv: inconsistent shapes")
        fn = self._fn16 if a.dtype is torch.float16 else self._fn
        fn(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), a.data_ptr(), b.data_ptr(), k,
           out.shape[1], rank, n, cols.data_ptr(), nseg, plan.data_ptr(), h.data_ptr(),
           torch.get_num_threads())


class LinearKernel:
    """y = x @ W.T for every CPU float32 projection, over W packed in column panels (csrc/linear.c)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.linear_panel.restype = ctypes.c_int64
        self.panel = int(lib.linear_panel())  # output columns per panel
        fn = lib.linear_forward
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i, i, p, i, i, p, i, ctypes.c_int]
        fn.restype = None
        self._fn = fn

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        """W [out, in] -> panels [ceil(out / panel), in, panel], the last one zero-padded, in fresh
        (64-byte aligned) memory, in huge pages where the system gives them (huge_pages.py)."""
        n, k = w.shape
        panels = -(-n // self.panel)
        padded = torch.cat([w, w.new_zeros(panels * self.panel - n, k)]) if n % self.panel else w
        out = weight_buffer(panels * k * self.panel * w.element_size()).view(w.dtype)
        return out.view(panels, k, self.panel).copy_(padded.reshape(panels, self.panel, k).transpose(1, 2))

    def unpack(self, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """The [out, in] matrix back (a copy)."""
        return packed.transpose(1, 2).reshape(-1, packed.shape[1])[:out_features].contiguous()

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """x: [T, in], T > 0 -> [T, out]. `packed` belongs to a Linear that checked it once."""
        t, k = x.shape
        if not cpu_float32(x) or x.stride(1) != 1 or t == 0:
            raise ValueError("linear_forward takes float32 CPU rows, each contiguous, at least one")
        if packed.shape[1] != k or not 0 < out_features <= packed.shape[0] * self.panel:
            raise ValueError("linear_forward: inconsistent shapes")
        y = torch.empty(t, out_features)
        self._fn(x.data_ptr(), t, x.stride(0), packed.data_ptr(), out_features, k, y.data_ptr(), out_features,
                 torch.get_num_threads())
        return y


# Each kernel is built on its loader's first call; None where it cannot be built or loaded.
@functools.cache
def load_paged_attention() -> PagedAttention | None:
    return load_kernel("paged_attention", PagedAttention)


@functools.cache
def load_lora_sgmv() -> LoraSgmv | None:
    return load_kernel("lora_sgmv", LoraSgmv)


@functools.cache
def load_linear() -> LinearKernel | None:
    return load_kernel("linear", LinearKernel)

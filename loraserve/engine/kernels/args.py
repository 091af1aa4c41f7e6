"""What the CPU kernels accept, checked on every call (so cheaply) before a pointer reaches C."""

from __future__ import annotations

import torch


def cpu_float32(t: torch.Tensor) -> bool:
    """What every kernel here reads. Checked per call, so cheaply: `t.device.type` alone costs ~200 ns,
    which adds up over ~120 kernel calls a step."""
    return t.dtype is torch.float32 and t.is_cpu


def kv_half(k_cache: torch.Tensor, v_cache: torch.Tensor, kernel: str) -> int:
    """1 for float16 K/V caches, 0 for float32 ones: the element type the kernels read and write."""
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (torch.float32, torch.float16) \
            or not k_cache.is_cpu or not v_cache.is_cpu or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous():
        raise ValueError(f"{kernel} takes contiguous float32 or float16 CPU K/V caches of one dtype")
    return int(k_cache.dtype is torch.float16)

"""Keep a CPU engine's per-step allocations in the heap instead of fresh page-faulted mappings (glibc).

Why: every CPU step allocates its activations anew (a 1024-token prefill chunk's gate/up output alone
is 12 MB). glibc serves an allocation above its mmap threshold with a fresh mapping, and hands a freed
heap top above its trim threshold back to the OS; either way the next step writes to new pages, and
the kernel faults in and zeroes each 4 KiB page: tens of thousands of faults a prefill chunk, paid in
system time on every step (BENCHMARKS.md, "Page faults on every step"). With the threshold at glibc's
maximum and trimming left to large surpluses, the same chunks fault almost no pages after the first.
PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason; this needs no
preload.

The cost: freed heap memory stays with the process (up to `_TRIM_BYTES` of it), which a server
reaches again at its next busy step anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# glibc refuses a larger threshold (HEAP_MAX_SIZE / 2 on 64-bit): allocations above it are still mapped.
_MMAP_BYTES = 32 << 20
_TRIM_BYTES = 1 << 30
_PAD_BYTES = 64 << 20


def keep_heap() -> bool:
    """Raise glibc's mmap threshold to its maximum, its trim threshold to `_TRIM_BYTES` and its top pad to
    `_PAD_BYTES` (which is what keeps a thread arena's emptied heap from being unmapped), process-wide.
    False (nothing changed) without glibc, or when the operator set malloc tunables in GLIBC_TUNABLES."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt accepts and ignores these
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_BYTES), (_M_TRIM_THRESHOLD, _TRIM_BYTES), (_M_TOP_PAD, _PAD_BYTES)))
    if not ok:
        log.warning("mallopt refused the heap settings: CPU steps will page-fault their activations")
    return ok

"""Weight buffers on transparent huge pages (Linux): the memory a decode step streams end to end.

Why: a decode step reads every weight once, at the memory's rate. In 4 KiB pages a 3.8 GB 7B is ~930,000
pages, each a TLB miss and a page walk on the way, and the hardware prefetchers stop at every page's end;
in 2 MiB pages it is ~1,800. The allocator's pages are 4 KiB unless the mapping is advised huge: most
distributions ship THP as "madvise" (this project's machines do), so nothing else gets them. A repacked
Q4_0 7B matrix read at one row went from 49.6 to 58.4 GB/s on a quiet host, 34.0 to 35.5 GB/s on a busy
one (BENCHMARKS.md, "Weights on huge pages").

Only a buffer's whole, aligned 2 MiB pages are advised: the kernel then never backs a huge page past its
end, so a buffer costs its own size in resident memory as before. Elsewhere (THP "never", no MADV_HUGEPAGE,
another OS) the same buffers are plain memory.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

HUGE_PAGE = 2 << 20
# Smaller buffers hold no whole aligned huge page often enough to be worth a mapping of their own.
MIN_BYTES = 4 * HUGE_PAGE
_ADVICE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def weight_buffer(nbytes: int) -> torch.Tensor:
    """A new uint8 [nbytes] tensor, 64-byte aligned (its contents undefined, as torch.empty's), its memory
    in huge pages where the system gives them. Freed with its last view, as any tensor."""
    if nbytes < 0:
        raise ValueError(f"a buffer of {nbytes} bytes")
    if _ADVICE is None or nbytes < MIN_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    # A huge page more than asked, so that the buffer can start on a huge page's boundary. The mapping is
    # page-aligned and lives as long as the storage that frombuffer ties to it.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    length = nbytes // HUGE_PAGE * HUGE_PAGE
    with contextlib.suppress(OSError):  # a kernel built without THP: plain pages
        mapping.madvise(_ADVICE, start, length)
    return whole[start:start + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype) on the CPU, from `weight_buffer`: for the KV cache, which decode
    attention reads a block at a time from all over it."""
    n = math.prod(shape) * dtype.itemsize
    return weight_buffer(n).view(dtype).view(shape).zero_()

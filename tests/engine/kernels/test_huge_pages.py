"""Weight buffers and the KV cache on transparent huge pages: advised where whole huge pages fit, resident no
more than their size, freed with their last view. Read from /proc/self/smaps, the kernel's own account of
each mapping (its VmFlags carry "hg" where MADV_HUGEPAGE was given)."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch

from loraserve.engine.kernels import huge_pages
from loraserve.engine.kernels.huge_pages import HUGE_PAGE, MIN_BYTES, weight_buffer

import engine_helpers

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")


def _mapping(address: int) -> dict[str, str] | None:
    """The smaps entry of the mapping holding `address`: its fields, or None when nothing maps it."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
            if entry is not None:
                return entry
            start, end = (int(x, 16) for x in head.split("-"))
            entry = {} if start <= address < end else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry


def _kb(entry: dict[str, str], key: str) -> int:
    return int(entry[key].split()[0])


def test_a_large_buffer_starts_on_a_huge_page_and_is_advised() -> None:
    n = 5 * HUGE_PAGE + 12345
    buf = weight_buffer(n)
    assert buf.dtype is torch.uint8 and buf.shape == (n,) and buf.is_contiguous()
    assert buf.data_ptr() % HUGE_PAGE == 0
    entry = _mapping(buf.data_ptr())
    assert entry is not None and "hg" in entry["VmFlags"].split()


def test_a_buffer_is_resident_no_more_than_its_size() -> None:
    """The head before the first huge page and the tail after the last whole one are never backed by a
    huge page: writing every byte makes the mapping resident for the buffer's size in 4 KiB pages."""
    n = 4 * HUGE_PAGE + 3 * 4096 + 100
    buf = weight_buffer(n)
    buf.fill_(7)
    entry = _mapping(buf.data_ptr())
    assert entry is not None
    assert _kb(entry, "Rss") <= -(-n // 4096) * 4
    assert _kb(entry, "AnonHugePages") <= 4 * HUGE_PAGE // 1024
    assert int(buf.sum()) == 7 * n


def test_small_buffers_are_plain_tensors() -> None:
    for n in (0, 1, MIN_BYTES - 1):
        buf = weight_buffer(n)
        assert buf.shape == (n,) and buf.dtype is torch.uint8
        if n:
            entry = _mapping(buf.data_ptr())
            assert entry is not None and "hg" not in entry["VmFlags"].split()
    with pytest.raises(ValueError):
        weight_buffer(-1)


def test_the_mapping_lives_as_long_as_any_view() -> None:
    buf = weight_buffer(MIN_BYTES)
    address = buf.data_ptr()
    buf[-3:] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    tail = buf[-3:]
    del buf
    gc.collect()
    assert tail.tolist() == [1, 2, 3] and _mapping(address) is not None
    del tail
    gc.collect()
    assert _mapping(address) is None  # unmapped: the memory went back


def test_zeros() -> None:
    z = huge_pages.zeros((3, MIN_BYTES // 16 + 5, 2), torch.float16)
    assert z.shape == (3, MIN_BYTES // 16 + 5, 2) and z.dtype is torch.float16 and z.is_contiguous()
    assert not z.any()
    assert z.data_ptr() % 64 == 0
    assert huge_pages.zeros((0, 4), torch.float32).shape == (0, 4)


def test_the_cpu_engine_keeps_its_weights_and_kv_cache_on_huge_pages() -> None:
    engine = engine_helpers.build_engine(engine_helpers.hf_model(seed=1, intermediate_size=20000),
                                         kv_cache_bytes=4 * MIN_BYTES)
    packed = engine.model.layers[0].gate_up.packed  # gate and up: 40000 x 64 float32, 10 MB
    for t in (packed, engine.kv.k, engine.kv.v):
        assert t.nbytes >= MIN_BYTES
        entry = _mapping(t.data_ptr())
        assert entry is not None and "hg" in entry["VmFlags"].split()

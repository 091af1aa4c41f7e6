"""The quantized projection kernel as the engine builds it, and its scalar fallback: a fixture the tests of
csrc/qlinear.c import (tests/engine/kernels/test_qlinear.py: weights as stored; test_qlinear_x8.py:
repacked). A module, not a conftest.py: the top-level conftest is imported by name elsewhere."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve.engine.kernels import cpu as cpu_kernels
from loraserve.engine.kernels.qlinear import QuantLinearKernel, load_qlinear


@pytest.fixture(scope="module", params=["native", "scalar"])
def kernel(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantLinearKernel]:
    """The kernel as the engine builds it, and the scalar fallback: the same source with the vector
    instruction sets switched off by a compiler wrapper that appends the flags (a cache of its own)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "scalar":
            cc = cpu_kernels._compiler()
            assert cc is not None
            tmp = tmp_path_factory.mktemp("scalar-cc")
            wrapper = tmp / "cc"
            # -mno-f16c as well: the fallback's own fp16 conversion is tested too
            wrapper.write_text(f'#!/bin/sh\nexec {cc} "$@" -mno-avx2 -mno-avx512f -mno-f16c\n')
            wrapper.chmod(0o755)
            mp.setenv("CC", str(wrapper))
            mp.setenv("LORASERVE_KERNEL_CACHE", str(tmp / "cache"))
        load_qlinear.cache_clear()
        try:
            k = load_qlinear()
            assert k is not None  # a compiler is present: the build must work
            if request.param == "scalar":
                assert k.vector_bits == 0
            elif _cpu_has("avx2"):
                assert k.vector_bits == 256
            yield k
        finally:
            load_qlinear.cache_clear()


def _cpu_has(flag: str) -> bool:
    text = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())

"""The quantized projection kernel as the engine builds it, and the same source with the wider vector
instruction sets switched off: a fixture the tests of csrc/qlinear.c import (tests/engine/kernels/
test_qlinear.py: weights as stored; test_qlinear_x8.py: repacked). A module, not a conftest.py: the
top-level conftest is imported by name elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraserve.engine.kernels import cpu as cpu_kernels
from loraserve.engine.kernels.qlinear import QuantLinearKernel, load_qlinear

# appended to the compiler's flags; scalar: -mno-f16c as well, so the fallback's own fp16 conversion is tested
_FLAGS = {"avx2": "-mno-avx512f", "scalar": "-mno-avx2 -mno-avx512f -mno-f16c"}


def _cpu_has(flag: str) -> bool:
    text = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())


def _vnni512() -> bool:
    return all(_cpu_has(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))


def qlinear_builds() -> list[str]:
    """The builds that differ on this CPU: the native one, the AVX2 one where it has AVX-512, the scalar
    fallback."""
    return ["native"] + (["avx2"] if _cpu_has("avx512f") else []) + ["scalar"]


def native_bits() -> int:
    """The vector path the native build runs here (csrc/qlinear.c's qlinear_vector_bits)."""
    return 512 if _vnni512() else 256 if _cpu_has("avx2") else 0


@pytest.fixture(scope="module", params=qlinear_builds())
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> QuantLinearKernel:
    """The kernel as the engine builds it, and the AVX2 and scalar builds: the same source with the wider
    instruction sets switched off by a compiler wrapper that appends the flags (a cache of its own). The
    environment is changed for the build only, and the loader's cache left empty after it, so that other
    tests' loads get the native build."""
    name = request.param
    if name == "native":
        k = load_qlinear()
    else:
        cc = cpu_kernels._compiler()
        assert cc is not None
        tmp = tmp_path_factory.mktemp(f"{name}-cc")
        wrapper = tmp / "cc"
        wrapper.write_text(f'#!/bin/sh\nexec {cc} "$@" {_FLAGS[name]}\n')
        wrapper.chmod(0o755)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CC", str(wrapper))
            mp.setenv("LORASERVE_KERNEL_CACHE", str(tmp / "cache"))
            load_qlinear.cache_clear()
            try:
                k = load_qlinear()
            finally:
                load_qlinear.cache_clear()
    assert k is not None  # a compiler is present: the build must work
    assert k.vector_bits == {"native": native_bits(), "avx2": 256, "scalar": 0}[name]
    return k

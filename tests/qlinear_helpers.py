"""The quantized projection kernel as the engine builds it, and the same source with the wider vector
instruction sets switched off: a fixture the tests of csrc/qlinear.c import (tests/engine/kernels/
test_qlinear.py: weights as stored; test_qlinear_x8.py: repacked). A module, not a conftest.py: the
top-level conftest is imported by name elsewhere."""

from __future__ import annotations

import pytest

from loraserve.engine.kernels.qlinear import QuantLinearKernel, load_qlinear

from kernel_builds import build, cpu_has

# scalar: -mno-f16c as well, so the fallback's own fp16 conversion is tested
_SCALAR_FLAGS = "-mno-avx2 -mno-avx512f -mno-f16c"


def _vnni512() -> bool:
    return all(cpu_has(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"))


def ymm_vnni() -> bool:
    """Whether this CPU runs the AVX-VNNI path (vpdpbusd on ymm registers) in a build of its own: an AVX-512
    VNNI one, through the instruction's EVEX encoding (`-DQLINEAR_YMM_VNNI`). On an AVX-VNNI CPU without
    AVX-512 the native build is that path."""
    return _vnni512()


def qlinear_builds() -> list[str]:
    """The builds that differ on this CPU: the native one, the AVX2 one where it has AVX-512 (and the AVX-VNNI
    one where it has AVX-512 VNNI), the scalar fallback."""
    return (["native"] + (["avx2"] if cpu_has("avx512f") else []) + (["avxvnni"] if ymm_vnni() else [])
            + ["scalar"])


def native_vnni() -> bool:
    return _vnni512() or cpu_has("avx_vnni")


def native_bits() -> int:
    """The vector path the native build runs here (csrc/qlinear.c's qlinear_vector_bits)."""
    return 512 if _vnni512() else 256 if cpu_has("avx2") else 0


@pytest.fixture(scope="module", params=qlinear_builds())
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> QuantLinearKernel:
    """The kernel as the engine builds it, and the AVX2 and scalar builds: the same source with the wider
    instruction sets switched off by a compiler wrapper that appends the flags (a cache of its own). The
    environment is changed for the build only, and the loader's cache left empty after it, so that other
    tests' loads get the native build."""
    name = request.param
    k = build(load_qlinear, name, tmp_path_factory, _SCALAR_FLAGS if name == "scalar" else None)
    assert k.vector_bits == {"native": native_bits(), "avx2": 256, "avxvnni": 256, "scalar": 0}[name]
    assert k.vnni == {"native": native_vnni(), "avx2": False, "avxvnni": True, "scalar": False}[name]
    assert k.instructions == {"native": k.instructions, "avx2": "AVX2", "avxvnni": "AVX-VNNI",
                              "scalar": "scalar (no AVX2)"}[name]
    return k

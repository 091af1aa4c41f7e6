"""A C kernel as the engine builds it, and built again with the wider vector instruction sets switched off,
so that each of its paths (AVX-512, AVX2, scalar) runs on a machine that has the wider ones: tests of
csrc/paged_attention.c and csrc/layer_glue.c parametrize their kernel fixture over `builds()`."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TypeVar, cast

import pytest

from loraserve.engine.kernels import build as kernel_build

K = TypeVar("K")

# avxvnni: csrc/qlinear.c's AVX-VNNI path, on an AVX-512 VNNI CPU (tests/qlinear_helpers.py)
_FLAGS = {"native": "", "avx2": "-mno-avx512f", "avxvnni": "-DQLINEAR_YMM_VNNI",
          "scalar": "-mno-avx2 -mno-avx512f"}


def cpu_has(flag: str) -> bool:
    text = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())


def builds() -> list[str]:
    """The builds that differ on this CPU: the native one, the AVX2 one where it has AVX-512, the scalar
    one where it has AVX2."""
    return ["native"] + (["avx2"] if cpu_has("avx512f") else []) + (["scalar"] if cpu_has("avx2") else [])


def tile(name: str) -> int:
    """The score tile csrc/paged_attention.c has in the build `name` (0: its scalar path)."""
    native = 16 if cpu_has("avx512f") else 8 if cpu_has("avx2") and cpu_has("fma") else 0
    return {"native": native, "avx2": 8, "scalar": 0}[name]


# the builds made in this test session, by (loader, name, flags): each is compiled once (qlinear.c takes
# seconds at -O3), however many modules and tests ask for it
_built: dict[tuple[str, str, str], object] = {}


def build(load: functools._lru_cache_wrapper[K | None], name: str, tmp: pytest.TempPathFactory,
          flags: str | None = None) -> K:
    """`load()` for the build `name`: the others through a compiler wrapper that appends the flags (the
    build's own, or `flags`), into a cache of their own, once a test session. The environment is changed for
    the build only, and the loader's cache is left empty after it, so the engine's own loads still get the
    native build."""
    key = (load.__wrapped__.__qualname__, name, _FLAGS[name] if flags is None else flags)
    if name != "native" and key in _built:
        return cast(K, _built[key])
    if name == "native":
        kernel = load()
    else:
        cc = kernel_build.compiler()
        assert cc is not None
        folder = tmp.mktemp(f"{name}-cc")
        wrapper = folder / "cc"
        wrapper.write_text(f'#!/bin/sh\nexec {cc} "$@" {_FLAGS[name] if flags is None else flags}\n')
        wrapper.chmod(0o755)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CC", str(wrapper))
            mp.setenv("LORASERVE_KERNEL_CACHE", str(folder / "cache"))
            load.cache_clear()
            try:
                kernel = load()
            finally:
                load.cache_clear()
    assert kernel is not None  # a compiler is present: the build must work
    if name != "native":
        _built[key] = kernel
    return kernel

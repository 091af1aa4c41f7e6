"""Building the C kernels in csrc/: compiled at first use with the machine's C compiler, then cached.

Built with -march=native, so the library is cached per source, its headers, flags, compiler and CPU
(`$LORASERVE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/loraserve/kernels`, else ~/.cache/loraserve/kernels)
and written under a temporary name, then renamed: concurrent first starts never load half a file.
OpenMP: the library's libgomp is the one torch already loaded (same soname), so both share one pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K")  # a kernel wrapper class

CSRC = Path(__file__).with_name("csrc")
# -ffp-contract=fast: ISO C mode would not fuse a * b + c into one FMA (projections ~10% faster with it).
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_BUILD_TIMEOUT_S = 120


def kernel_cache_dir() -> Path:
    if env := os.environ.get("LORASERVE_KERNEL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loraserve" / "kernels"


def compiler() -> str | None:
    cc = os.environ.get("CC")
    return cc if cc else shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another (home on NFS)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(source: Path, cc: str, cache_dir: Path) -> Path:
    """The shared library for `source`, compiled unless a build with the same inputs is cached.
    Raises OSError or subprocess.CalledProcessError when the compiler fails."""
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what the source may #include
    for part in (source.read_bytes(), *headers, " ".join(_FLAGS).encode(), cc.encode(),
                 _cpu_signature().encode()):
        key.update(part)
    lib = cache_dir / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{lib.name}.", suffix=".tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(source), "-o", tmp, "-lm"], check=True, capture_output=True,
                       timeout=_BUILD_TIMEOUT_S)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load_kernel(name: str, wrap: Callable[[ctypes.CDLL], K]) -> K | None:
    """csrc/`name`.c built, loaded and wrapped; None (logged) where that cannot be done."""
    source = CSRC / f"{name}.c"
    cc = compiler()
    if cc is None:
        log.warning("no C compiler found: %s falls back to torch", name)
        return None
    try:
        return wrap(ctypes.CDLL(str(build(source, cc, kernel_cache_dir()))))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("could not build %s (%s%s): it falls back to torch", source.name, e,
                    ": " + detail.decode(errors="replace")[-500:] if detail else "")
        return None

"""The GGUF model file the llama.cpp baseline runs, chosen so that it holds the weights our engine runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraserve.engine.config import EngineConfig
from loraserve.engine.sources import EMBEDDED, RANDOM_PREFIX, embedded_gguf_path
from loraserve.tools.bench.llamacpp import INSTALL_HINT, available


@dataclass(frozen=True)
class ModelFile:
    path: Path | None  # None: the baseline does not run, `reason` says why (empty: it was asked off)
    reason: str = ""
    # Random weights exist only in memory: when a file stands for them, our engine loads that file too,
    # so that both sides run the same weights whatever produced it.
    engine_loads_it: bool = False
    write_from: str | None = None  # a random:NAME:TYPE source `path` is written from, when missing


def cache_dir() -> Path:
    """Where random models are written as GGUF files, once each ($LORASERVE_BENCH_CACHE, else the XDG
    cache): a 7B one takes minutes and 4 GB."""
    if env := os.environ.get("LORASERVE_BENCH_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraserve" / "bench"


def llamacpp_file(source: str, explicit: Path | None, requested: bool | None, on_cpu: bool) -> ModelFile:
    """`requested`: --llamacpp / --no-llamacpp / neither (then on where it can run and compare)."""
    if requested is False:
        return ModelFile(None)
    if not available():
        return ModelFile(None, f"llama-cpp-python is not installed; {INSTALL_HINT}")
    if requested is None and not on_cpu:
        return ModelFile(None, "llama.cpp runs on the CPU here (--llamacpp runs it anyway)")
    return model_file(source, explicit)


def model_file(source: str, explicit: Path | None) -> ModelFile:
    """The file for `source` (`--model`), or `explicit` (`--llamacpp-model`) when given."""
    is_random = source.startswith(RANDOM_PREFIX)
    if explicit is not None:
        if not explicit.is_file():
            raise ValueError(f"--llamacpp-model {explicit}: no such file")
        return ModelFile(explicit, engine_loads_it=is_random)
    if source == EMBEDDED:
        return ModelFile(embedded_gguf_path())
    if source.endswith(".gguf"):
        return ModelFile(Path(source))
    if is_random:
        name, _, kind = source.removeprefix(RANDOM_PREFIX).partition(":")
        if not kind:
            return ModelFile(None, f"{source} has float weights, which llama.cpp would run as F32: use "
                                   f"{source}:q4_0 (or q8_0, q4_1, q4_k_m, q5_k_m), or give "
                                   f"--llamacpp-model PATH")
        # The seed is the engine's default, the one `loraserve quantize` and the bench's engine use.
        path = cache_dir() / f"{name}-{kind}-seed{EngineConfig().seed}.gguf"
        return ModelFile(path, engine_loads_it=True, write_from=source)
    return ModelFile(None, f"{source} is not a GGUF file: give --llamacpp-model PATH, a GGUF conversion of "
                           "the same weights")


def ensure_written(found: ModelFile, log: Callable[[str], None]) -> None:
    """Write a random model's file if it is not there yet (`loraserve quantize`'s writer, same blocks)."""
    if found.write_from is None or found.path is None or found.path.is_file():
        return
    from loraserve.engine.weights.convert import convert

    log(f"writing {found.write_from} to {found.path} (once: later runs reuse it)")
    found.path.parent.mkdir(parents=True, exist_ok=True)
    convert(found.write_from, found.path, None)

"""The perplexity table: one row per adapter, a column per scorer, and the ratios the quality targets
are stated in (each of our weight modes and llama.cpp against our float32)."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass
from pathlib import Path

FLOAT32 = "float32"
# An adapter whose perplexity is this many times the base model's has drowned the model: a quantization
# error of 1-3% is then measured on a distribution the text no longer says much about.
SWAMPED = 2.0


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-math.fsum(logprobs) / len(logprobs))


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and whether it has AVX-512 (our kernels and llama.cpp's take other paths)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return f"{platform.machine()} (no {cpuinfo})"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return f"{name}, {'avx512f' if 'avx512f' in flags else 'no avx512f'}"


@dataclass(frozen=True)
class Column:
    label: str  # "ours auto (gguf)", "ours float32", "llama.cpp"
    perplexities: dict[str | None, float]  # per adapter key, None: no adapter
    is_float32: bool = False


def _pct(x: float, ref: float) -> str:
    return f"{(x / ref - 1) * 100:+.2f}%"


def table(columns: list[Column], adapters: dict[str | None, str]) -> str:
    """Markdown; `adapters` maps each key to its row label, in row order."""
    ref = next((c for c in columns if c.is_float32), None)
    others = [c for c in columns if ref is not None and c is not ref]
    head = ["adapter", *(c.label for c in columns), *(f"{c.label} / {ref.label} - 1" for c in others if ref)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in adapters.items():
        cells = [label, *(f"{c.perplexities[key]:.4f}" for c in columns)]
        if ref is not None:
            cells += [_pct(c.perplexities[key], ref.perplexities[key]) for c in others]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def adapter_notes(column: Column, adapters: dict[str | None, str]) -> list[str]:
    """How far each adapter moves the perplexity, and a warning where it swamps the model."""
    base = column.perplexities[None]
    notes = []
    for key, label in adapters.items():
        if key is None:
            continue
        factor = column.perplexities[key] / base
        line = f"{label} moves the perplexity x{factor:.3f} ({column.label})"
        if factor > SWAMPED or factor < 1 / SWAMPED:
            line += ": the adapter swamps the model, its row scores a distribution the text hardly shapes"
        notes.append(line)
    return notes

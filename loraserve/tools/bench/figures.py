"""A run's throughput and latency figures from its finished requests: one definition for our engine's
rows (workload.py) and llama.cpp's (llamacpp.py), so their ratios compare like with like."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StreamTiming:
    """One finished request as every engine's rows count it: submission to first token (prompt
    processing, queueing included), then first token to last."""

    prompt_tokens: int
    first_s: float
    rest_s: float
    output_tokens: int


def stream_figures(done: Sequence[StreamTiming], wall_s: float, output_tokens: int, prompt_tokens: int,
                   failed: int) -> dict[str, Any]:
    """The throughput and latency figures of a run, ours or llama.cpp's, from its finished requests;
    `output_tokens` and `prompt_tokens` count every request, failed ones too."""
    ttft = [t.first_s * 1e3 for t in done]
    tpot = [t.rest_s * 1e3 / (t.output_tokens - 1) for t in done if t.output_tokens > 1]
    # Per stream: prompt tokens over the time to each first token (a prompt rate only at concurrency 1),
    # tokens after it over the time after.
    first_s, rest_s = sum(t.first_s for t in done), sum(t.rest_s for t in done)
    decoded = sum(t.output_tokens - 1 for t in done)
    return {
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall_s,
        "request_s": len(done) / wall_s,
        "completed": len(done),
        "failed": failed,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50),
        "tpot_p99_ms": percentile(tpot, 99),
        "prompt_tok_s": sum(t.prompt_tokens for t in done) / first_s if first_s else None,
        "generation_tok_s": decoded / rest_s if decoded and rest_s else None,
        "total_tok_s": (prompt_tokens + output_tokens) / wall_s,
    }


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None

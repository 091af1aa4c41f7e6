"""Our engine's side: the log-probability of each token of a text, as `/v1/completions` with `echo`,
`logprobs: 0` and `max_tokens: 0` reports it (the engine's prompt scores: the same request the API
sends), under no adapter and under each adapter."""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.engine.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.types import AdapterRef, FinishReason, SamplingParams

# What the API's completions request with echo, logprobs 0 and max_tokens 0 asks of the engine.
SCORE_PROMPT = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)


@dataclass(frozen=True)
class EngineScores:
    dtype: str  # the weight mode the engine ran: "gguf" where auto kept the file's blocks
    # per adapter key (None: no adapter), the logprob of each token but the first
    logprobs: dict[str | None, list[float]]


def engine_config(dtype: str, threads: int, kv_dtype: str) -> EngineConfig:
    # One sequence at a time: the KV cache holds one window, not the server's 64.
    return EngineConfig(dtype=dtype, threads=threads, max_num_seqs=1, kv_dtype=kv_dtype)


def score(engine: LLMEngine, ids: list[int], adapter: AdapterRef | None) -> list[float]:
    """The logprob of ids[1:], each given the ones before it."""
    key = adapter.key if adapter else "none"
    seq = engine.add_request(f"perplexity-{key}", ids, SCORE_PROMPT, adapter)
    engine.drain()
    scores = seq.prompt_scores
    if seq.finish_reason is not FinishReason.LENGTH:
        raise RuntimeError(f"the engine scored no prompt (finished: {seq.finish_reason})")
    if scores is None or len(scores) != len(ids) - 1:
        got = None if scores is None else len(scores)
        raise RuntimeError(f"expected {len(ids) - 1} prompt scores, got {got}")
    for pos, s in enumerate(scores, start=1):
        if s.ids[0] != ids[pos]:
            raise RuntimeError(f"prompt score {pos} is for token {s.ids[0]}, not {ids[pos]}")
    return [s.logprobs[0] for s in scores]


def score_all(engine: LLMEngine, ids: list[int], adapters: list[AdapterRef]) -> EngineScores:
    out: dict[str | None, list[float]] = {None: score(engine, ids, None)}
    for ref in adapters:
        out[ref.key] = score(engine, ids, ref)
    return EngineScores(engine.ecfg.dtype, out)

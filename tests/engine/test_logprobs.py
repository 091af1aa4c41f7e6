"""Log-probabilities from the engine, checked against log_softmax of transformers' (and PEFT's) logits on
the same weights: the prompt's, chunk after chunk, and the generated tokens', with and without adapters
in mixed batches, with a cached prefix, under preemption, and whatever the sampling settings."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from loraserve.engine.core.sequence import Sequence, TokenScores
from loraserve.engine.llm_engine import LLMEngine
from loraserve.types import AdapterRef, FinishReason, SamplingParams

from engine_helpers import (
    build_engine,
    hf_model,
    make_adapters,
    peft_reference,
    random_prompts,
    reference_logits,
    wait_adapters_in_host,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ATOL = 1e-4  # fp32 engine vs fp32 transformers, as the logits parity tests
ADAPTERS = ["r1-qv", "r8-all", "r64-attn"]


@pytest.fixture(scope="module")
def base() -> Any:
    return hf_model(seed=31)


@pytest.fixture(scope="module")
def adapters(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(base, tmp_path_factory.mktemp("adapters"), ADAPTERS)


@pytest.fixture(scope="module")
def reference(base: Any, adapters: dict[str, Path]) -> Any:
    return peft_reference(base, adapters)


@dataclass
class Collected:
    """What the step outputs said about one request."""

    logprobs: list[TokenScores] = field(default_factory=list)
    prompt: list[list[TokenScores]] = field(default_factory=list)  # each time prompt scores came
    tokens: list[int | None] = field(default_factory=list)


def drive(engine: LLMEngine) -> dict[str, Collected]:
    seen: dict[str, Collected] = defaultdict(Collected)
    while engine.has_work():
        for out in engine.step():
            c = seen[out.seq.request_id]
            c.tokens.append(out.token)
            if out.logprobs is not None:
                c.logprobs.append(out.logprobs)
            if out.prompt_scores is not None:
                c.prompt.append(list(out.prompt_scores))
    return seen


def expected(ref_logits: torch.Tensor, position: int, token: int, k: int) -> TokenScores:
    """The scores of `token` at `position` + 1, from the logits at `position`."""
    lp = torch.log_softmax(ref_logits[position], dim=-1)
    values, ids = lp.topk(k)
    return TokenScores((token, *ids.tolist()), (float(lp[token]), *values.tolist()))


def assert_scores(got: TokenScores, want: TokenScores, where: str) -> None:
    assert got.ids == want.ids, where
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=ATOL, rtol=0,
                               msg=lambda m: f"{where}: {m}")


def check_sequence(seq: Sequence, got: Collected, ref_logits: torch.Tensor) -> None:
    p = seq.params
    n = seq.num_prompt
    if p.prompt_logprobs is not None:
        [prompt] = got.prompt  # exactly once
        assert len(prompt) == n - 1
        for pos, scores in enumerate(prompt):
            assert_scores(scores, expected(ref_logits, pos, seq.token_ids[pos + 1], p.prompt_logprobs),
                          f"{seq.request_id} prompt token {pos + 1}")
    else:
        assert got.prompt == []
    if p.logprobs is not None:
        assert len(got.logprobs) == seq.num_output
        for i, scores in enumerate(got.logprobs):
            assert_scores(scores, expected(ref_logits, n - 1 + i, seq.output_ids[i], p.logprobs),
                          f"{seq.request_id} output token {i}")
    else:
        assert got.logprobs == []


@pytest.mark.parametrize("budget", [1024, 5])  # 5: prompts in many chunks, rows carried across them
def test_prompt_and_output_logprobs_equal_transformers(base: Any, budget: int) -> None:
    engine = build_engine(base, max_num_batched_tokens=budget)
    prompts = random_prompts([17, 1, 9, 30], seed=4)
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=5),
              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),  # asks for nothing
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)]
    seqs = [engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    got = drive(engine)
    for seq in seqs:
        check_sequence(seq, got[seq.request_id], reference_logits(base, None, seq.token_ids, None))
    assert engine.blocks.num_used == 0


def test_logprobs_are_of_the_raw_distribution(base: Any) -> None:
    """Temperature, top-k/p and penalties shape the draw, not the reported distribution."""
    engine = build_engine(base)
    prompt = random_prompts([12], seed=5)[0]
    shaped = SamplingParams(max_tokens=8, temperature=1.7, top_k=20, top_p=0.8, repetition_penalty=1.5,
                            frequency_penalty=1.0, presence_penalty=0.5, seed=3, ignore_eos=True, logprobs=4,
                            prompt_logprobs=1)
    seq = engine.add_request("shaped", prompt, shaped)
    got = drive(engine)
    check_sequence(seq, got["shaped"], reference_logits(base, None, seq.token_ids, None))


def test_mixed_adapters_in_one_batch(base: Any, adapters: dict[str, Path], reference: Any) -> None:
    refs = {name: AdapterRef(name, str(path)) for name, path in adapters.items()}
    names: list[str | None] = ["r8-all", None, "r1-qv", "r64-attn", "r8-all", None]
    prompts = random_prompts([21, 6, 13, 2, 9, 15], seed=6)

    def run(ask: bool) -> tuple[list[Sequence], dict[str, Collected]]:
        engine = build_engine(base, max_num_batched_tokens=16)
        seqs = []
        for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
            scored = ask and i % 2 == 0  # neighbours that ask nothing share the steps
            params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                    logprobs=2 if scored else None, prompt_logprobs=3 if scored else None)
            seqs.append(engine.add_request(f"m{i}", prompt, params, refs[name] if name else None))
        wait_adapters_in_host(engine, {refs[n].key for n in names if n})
        return seqs, drive(engine)

    seqs, got = run(ask=True)
    for seq, name in zip(seqs, names, strict=True):
        check_sequence(seq, got[seq.request_id], reference_logits(base, reference, seq.token_ids, name))
    # Asking for logprobs changes nobody's tokens, its own or its neighbours'.
    plain, _ = run(ask=False)
    assert [s.output_ids for s in seqs] == [s.output_ids for s in plain]


def test_max_tokens_zero_scores_the_prompt_only(base: Any) -> None:
    engine = build_engine(base, max_num_batched_tokens=8)
    prompt = random_prompts([19], seed=7)[0]
    seq = engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=1))
    got = drive(engine)["score"]
    assert seq.output_ids == [] and seq.finish_reason is FinishReason.LENGTH
    assert got.tokens == [None]  # one output: the end, with the scores
    check_sequence(seq, got, reference_logits(base, None, prompt, None))
    logprobs = torch.log_softmax(reference_logits(base, None, prompt, None), dim=-1)
    direct = sum(float(logprobs[p, prompt[p + 1]]) for p in range(len(prompt) - 1))
    assert sum(s.logprobs[0] for s in got.prompt[0]) == pytest.approx(direct, abs=1e-3)
    assert engine.generate([prompt], SamplingParams(max_tokens=0)) == [[]]  # nothing asked: still ends
    assert engine.blocks.num_used == 0


def test_a_cached_prefix_does_not_skip_scored_positions(base: Any) -> None:
    engine = build_engine(base)
    prompt = random_prompts([26], seed=8)[0]
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.generate([prompt], greedy)  # files the prompt's blocks in the prefix cache
    hits = engine.stats()["prefix_cache_hit_tokens"]
    seq = engine.add_request("scored", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                              prompt_logprobs=2, logprobs=2))
    got = drive(engine)
    check_sequence(seq, got["scored"], reference_logits(base, None, seq.token_ids, None))
    assert engine.stats()["prefix_cache_hit_tokens"] == hits  # every position was computed
    engine.generate([prompt], greedy)
    assert engine.stats()["prefix_cache_hit_tokens"] == hits + 24  # the others still reuse it


def test_preemption_keeps_the_prompt_scores(base: Any) -> None:
    # Room for one context window and a block: the three long requests cannot all fit at once.
    engine = build_engine(base, context_window=64, kv_cache_bytes=1, max_num_batched_tokens=8)
    prompts = random_prompts([40, 33, 45], seed=9)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    seqs = [engine.add_request(f"p{i}", p, params) for i, p in enumerate(prompts)]
    got = drive(engine)
    assert sum(s.num_preemptions for s in seqs) > 0
    for seq in seqs:
        check_sequence(seq, got[seq.request_id], reference_logits(base, None, seq.token_ids, None))


def test_sampling_params_bound_the_alternatives() -> None:
    SamplingParams(logprobs=20, prompt_logprobs=0, max_tokens=0)
    for given in ({"logprobs": 21}, {"prompt_logprobs": -1}, {"max_tokens": -1}):
        with pytest.raises(ValueError):
            SamplingParams(**given)

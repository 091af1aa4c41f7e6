"""LLMEngine end to end on a tiny random Llama: scheduling limits never change outputs, seeds reproduce,
penalties push the right way, stops and limits behave, stats add up."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loraserve.engine.core.sequence import Sequence, SequenceStatus
from loraserve.engine.llm_engine import LLMEngine, cpu_kv_budget
from loraserve.engine.ops.attention import GatherAttention
from loraserve.types import FinishReason, QueueFull, SamplingParams

from engine_helpers import build_engine, hf_greedy, hf_model


@pytest.fixture(scope="module")
def base() -> Any:
    return hf_model(seed=21)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def _drain(engine: LLMEngine, max_steps: int = 10_000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps
    return steps


def _repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


PROMPTS = _prompts([17, 3, 30, 9, 1, 22])
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SAMPLED = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)
           for s in range(6)]


@pytest.fixture(scope="module")
def unconstrained(base: Any) -> tuple[list[list[int]], list[list[int]]]:
    engine = build_engine(base)
    return engine.generate(PROMPTS, GREEDY), engine.generate(PROMPTS, SAMPLED)


def test_greedy_equals_transformers(base: Any, unconstrained: Any) -> None:
    greedy, _ = unconstrained
    for prompt, out in zip(PROMPTS[:3], greedy[:3], strict=True):
        assert out == hf_greedy(base, prompt, 24)


def test_chunked_prefill_gives_identical_outputs(base: Any, unconstrained: Any) -> None:
    engine = build_engine(base, max_num_batched_tokens=5)
    seqs = [engine.add_request(f"c{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    steps = _drain(engine)
    assert steps > 24 + 30 // 5  # the long prompts really went in several chunks
    assert [s.output_ids for s in seqs] == unconstrained[0]
    engine = build_engine(base, max_num_batched_tokens=5)
    assert engine.generate(PROMPTS, SAMPLED) == unconstrained[1]


@pytest.mark.parametrize("params", ["greedy", "seeded"])
def test_preemption_gives_identical_outputs(base: Any, unconstrained: Any, params: str) -> None:
    # Room for one context window (64 tokens) plus a block: six sequences of up to 54 tokens cannot all fit.
    engine = build_engine(base, context_window=64, kv_cache_bytes=1, max_num_batched_tokens=32)
    assert engine.blocks.num_blocks == 17
    plist = [GREEDY] * len(PROMPTS) if params == "greedy" else SAMPLED
    seqs = [engine.add_request(f"p{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, plist, strict=True))]
    _drain(engine)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == unconstrained[0 if params == "greedy" else 1]
    assert engine.blocks.num_used == 0


def test_max_num_seqs_one_serialises_without_changing_outputs(base: Any, unconstrained: Any) -> None:
    engine = build_engine(base, max_num_seqs=1)
    assert engine.generate(PROMPTS, SAMPLED) == unconstrained[1]


def test_abort_frees_all_blocks(base: Any) -> None:
    engine = build_engine(base, max_num_seqs=2)
    seqs = [engine.add_request(f"a{i}", p, GREEDY) for i, p in enumerate(PROMPTS[:4])]
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["queue_depth"] == 2
    assert engine.blocks.num_used > 0
    assert engine.abort("a0") is seqs[0]  # running
    assert engine.abort("a3") is seqs[3]  # waiting
    assert seqs[0].finish_reason is FinishReason.ABORT and seqs[3].finish_reason is FinishReason.ABORT
    assert seqs[0].status is SequenceStatus.FINISHED and seqs[0].block_table == []
    assert engine.blocks.num_used == len(seqs[1].block_table)
    assert engine.abort("a0") is None and engine.abort("nobody") is None
    engine.abort("a1")
    engine.abort("a2")
    assert engine.blocks.num_used == 0 and not engine.has_work()
    stats = engine.stats()
    assert (stats["running"] == 0 and stats["queue_depth"] == 0
            and stats["kv_blocks_free"] == stats["kv_blocks_total"])
    # The request id can be used again once finished.
    engine.add_request("a0", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0))
    _drain(engine)


def test_seed_reproduces_alone_or_in_a_batch(base: Any) -> None:
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = build_engine(base).generate([PROMPTS[0]], p)[0]
    engine = build_engine(base)
    others = [SamplingParams(max_tokens=n, temperature=0.8, ignore_eos=True) for n in (5, 30, 12)]
    batch = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]],
                            [others[0], p, others[1], others[2]])
    assert batch[1] == alone
    # Again on the same engine (its default generator has moved on; the seed still rules).
    assert engine.generate([PROMPTS[0]], p)[0] == alone
    # And it really samples: not the greedy output, and another seed gives another output.
    assert alone != build_engine(base).generate([PROMPTS[0]], GREEDY)[0][:20]
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, seed=1235, ignore_eos=True)
    assert engine.generate([PROMPTS[0]], other_seed)[0] != alone


def test_unseeded_requests_follow_the_engine_seed(base: Any) -> None:
    p = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = build_engine(base, seed=5).generate(PROMPTS[:2], p)
    b = build_engine(base, seed=5).generate(PROMPTS[:2], p)
    c = build_engine(base, seed=6).generate(PROMPTS[:2], p)
    assert a == b and a != c


def test_temperature_zero_is_greedy(base: Any, unconstrained: Any) -> None:
    engine = build_engine(base)
    # top_k 1 at any temperature and a seed must also pick the argmax.
    top1 = SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert engine.generate(PROMPTS, top1) == unconstrained[0]
    seeded_greedy = SamplingParams(max_tokens=24, temperature=0, seed=99, top_p=0.1, ignore_eos=True)
    assert engine.generate(PROMPTS, seeded_greedy) == unconstrained[0]


def test_presence_penalty_reduces_repeats(base: Any, unconstrained: Any) -> None:
    greedy = unconstrained[0]
    assert sum(_repeats(o) for o in greedy) > 10  # the random model loops, so there is something to reduce
    engine = build_engine(base)
    penalised = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, presence_penalty=2.0,
                                                        ignore_eos=True))
    assert sum(_repeats(o) for o in penalised) < sum(_repeats(o) for o in greedy)


def test_frequency_penalty_both_ways(base: Any, unconstrained: Any) -> None:
    greedy = unconstrained[0]
    engine = build_engine(base)
    less = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, frequency_penalty=2.0,
                                                   ignore_eos=True))
    more = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, frequency_penalty=-2.0,
                                                   ignore_eos=True))
    assert sum(_repeats(o) for o in less) < sum(_repeats(o) for o in greedy) < sum(_repeats(o) for o in more)


def test_repetition_penalty_avoids_prompt_and_output_tokens(base: Any, unconstrained: Any) -> None:
    greedy = unconstrained[0]

    def reused(outs: list[list[int]]) -> int:
        # Tokens that repeat one already in the prompt or earlier in the output.
        total = 0
        for prompt, out in zip(PROMPTS, outs, strict=True):
            seen = set(prompt)
            for t in out:
                total += t in seen
                seen.add(t)
        return total

    engine = build_engine(base)
    penalised = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, repetition_penalty=2.0,
                                                        ignore_eos=True))
    assert reused(penalised) < reused(greedy)


def _first_repeat_free(out: list[int]) -> tuple[int, int]:
    """(index, token) of an output token that does not occur before it, past the start."""
    for i in range(3, len(out)):
        if out[i] not in out[:i]:
            return i, out[i]
    raise AssertionError("no fresh token")


def test_stop_token_ids_and_max_tokens(base: Any, unconstrained: Any) -> None:
    out = unconstrained[0][0]
    i, tok = _first_repeat_free(out)
    engine = build_engine(base)
    stop = engine.add_request("stop", PROMPTS[0],
                              SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(tok,)))
    length = engine.add_request("len", PROMPTS[0],
                                SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    _drain(engine)
    assert stop.output_ids == out[:i + 1] and stop.finish_reason is FinishReason.STOP
    assert length.output_ids == out[:5] and length.finish_reason is FinishReason.LENGTH


def test_model_eos_stops_unless_ignored(base: Any, unconstrained: Any) -> None:
    out = unconstrained[0][2]
    i, tok = _first_repeat_free(out)
    engine = build_engine(base)
    engine.eos_ids = frozenset({tok})
    stops = engine.add_request("eos", PROMPTS[2], SamplingParams(max_tokens=24, temperature=0))
    ignores = engine.add_request("ign", PROMPTS[2], GREEDY)
    _drain(engine)
    assert stops.output_ids == out[:i + 1] and stops.finish_reason is FinishReason.STOP
    assert ignores.output_ids == out and ignores.finish_reason is FinishReason.LENGTH


def test_context_window_is_checked(base: Any) -> None:
    engine = build_engine(base, context_window=32)
    assert engine.context_window == 32
    with pytest.raises(ValueError):
        engine.add_request("big", list(range(3, 30)), SamplingParams(max_tokens=6))
    with pytest.raises(ValueError):
        engine.add_request("huge", list(range(3, 40)), SamplingParams(max_tokens=1))
    assert not engine.has_work()
    seq = engine.add_request("fits", list(range(3, 30)),
                             SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    _drain(engine)
    assert seq.num_tokens == 32 and seq.finish_reason is FinishReason.LENGTH
    # A window past the model's positions is capped to them.
    assert build_engine(base, context_window=10_000).context_window == base.config.max_position_embeddings


def test_bad_requests_are_refused(base: Any) -> None:
    engine = build_engine(base)
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError):
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError):
        engine.add_request("empty", [], SamplingParams(max_tokens=2))
    _drain(engine)


def test_queue_limit_raises_queue_full(base: Any) -> None:
    engine = build_engine(base, max_queue=3, max_num_seqs=1)
    for i in range(3):
        engine.add_request(f"q{i}", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(QueueFull):
        engine.add_request("q3", [5, 6, 7], SamplingParams(max_tokens=3))
    assert engine.stats()["queue_depth"] == 3
    engine.step()  # one starts running, so one place in the queue frees up
    engine.add_request("q3", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(QueueFull):
        engine.add_request("q4", [5, 6, 7], SamplingParams(max_tokens=3))
    _drain(engine)
    assert engine.stats()["queue_depth"] == 0


def test_stats(base: Any) -> None:
    engine = build_engine(base, max_num_seqs=2, block_size=4)
    stats = engine.stats()
    total = stats["kv_blocks_total"]
    assert total == engine.blocks.num_blocks > 0
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] == total
    assert stats["queue_depth"] == 0 and stats["running"] == 0
    assert stats["adapters_host"] == stats["adapters_device"] == stats["adapters_pinned"] == 0
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"s{i}", [5] * n, p) for i, n in enumerate((5, 9, 2))]
    assert engine.stats()["queue_depth"] == 3
    engine.step()
    stats = engine.stats()
    # Two running: 5 and 9 prompt tokens computed -> 2 + 3 blocks of 4.
    assert stats["running"] == 2 and stats["queue_depth"] == 1
    assert stats["kv_blocks_used"] == 5 and stats["kv_blocks_free"] == total - 5
    assert [s.num_output for s in seqs] == [1, 1, 0]
    _drain(engine)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["queue_depth"] == 0 and stats["kv_blocks_used"] == 0
    assert all(s.num_output == 3 for s in seqs)


def test_step_outputs_report_tokens_and_finishes(base: Any) -> None:
    engine = build_engine(base)
    seq = engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    seen: list[int] = []
    finished: list[bool] = []
    while engine.has_work():
        for out in engine.step():
            assert out.seq is seq and out.token is not None
            seen.append(out.token)
            finished.append(out.finished)
    assert seen == seq.output_ids and finished == [False, False, True]


def test_default_kv_budget_holds_at_least_one_window(base: Any) -> None:
    engine = build_engine(base, context_window=100, kv_cache_bytes=1, block_size=16)
    assert engine.blocks.num_blocks == 8  # ceil(100 / 16) + 1
    seq: Sequence = engine.add_request("w", [5] * 60,
                                       SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    _drain(engine)
    assert seq.num_output == 40


GIB, MIB = 1 << 30, 1 << 20


@pytest.mark.parametrize(("per_token", "want", "memory", "budget"), [
    (46080, 24 * GIB, 24 * GIB, GIB),  # SmolLM2 in float32: 1 GiB, ~23k tokens
    (MIB, 256 * GIB, 64 * GIB, 8 * GIB),  # a 7B in float32: 8192 tokens, where 1 GiB held 1024
    (MIB, 256 * GIB, 24 * GIB, 6 * GIB),  # ... within a quarter of the machine's memory
    (MIB, 100 * MIB, 64 * GIB, 100 * MIB),  # every sequence's full window needs less: that much
    (46080, 24 * GIB, 2 * GIB, 512 * MIB),  # a small machine
])
def test_cpu_kv_budget_scales_with_the_token_and_stays_within_memory(per_token: int, want: int, memory: int,
                                                                     budget: int) -> None:
    assert cpu_kv_budget(per_token, want, memory) == budget


@pytest.mark.parametrize("native", [True, False])
def test_a_float16_kv_cache_holds_twice_the_tokens_and_decodes_alike(base: Any, unconstrained: Any,
                                                                    native: bool) -> None:
    """K/V rounded to float16 (EngineConfig.kv_dtype), through the C kernels and through torch's path: the
    same greedy tokens as the float32 cache on this model, in half the bytes a token."""
    engine = build_engine(base, kv_dtype="float16", native_kernels=native, kv_cache_bytes=1 << 20)
    wide = build_engine(base, kv_dtype="float32", native_kernels=native, kv_cache_bytes=1 << 20)
    assert engine.kv.k.dtype is torch.float16 and wide.kv.k.dtype is torch.float32
    assert engine.blocks.num_blocks == 2 * wide.blocks.num_blocks
    assert engine.generate(PROMPTS, GREEDY) == unconstrained[0]


def test_kv_dtype_auto_is_float16_for_gguf_blocks_only() -> None:
    from loraserve.engine.config import EngineConfig
    from loraserve.engine.llm_engine import resolve_kv_dtype

    assert resolve_kv_dtype(EngineConfig(dtype="gguf"), torch.float32) is torch.float16
    assert resolve_kv_dtype(EngineConfig(), torch.float32) is torch.float32
    assert resolve_kv_dtype(EngineConfig(dtype="gguf", kv_dtype="float32"), torch.float32) is torch.float32
    assert resolve_kv_dtype(EngineConfig(kv_dtype="float16"), torch.float32) is torch.float16
    for bad in (dict(kv_dtype="bfloat16"), dict(kv_dtype="float16", device="cuda")):
        with pytest.raises(ValueError, match="kv_dtype"):
            EngineConfig(**bad)


def test_torch_attention_path_gives_identical_outputs(base: Any, unconstrained: Any) -> None:
    """The default CPU engine decodes through the paged C kernel (when a compiler is present); torch's
    gather + SDPA path, kept for machines without one, must give the same tokens."""
    engine = build_engine(base, native_kernels=False)
    assert type(engine.ops.attention) is GatherAttention
    assert engine.generate(PROMPTS, GREEDY) == unconstrained[0]
    assert engine.generate(PROMPTS, SAMPLED) == unconstrained[1]

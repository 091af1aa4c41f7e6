"""AsyncEngine, the server's Backend: streaming events from the step thread, aborts, concurrency.

One random:tiny backend per module. Its token ids are checked against a second, synchronous engine
loaded from the same source (same seed, so the same weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_backend, load_engine
from loraserve.engine.weights.token_bytes import TokenBytes
from loraserve.tools.bench.workload import count_steps
from loraserve.types import (
    AdapterRef,
    ChatMessage,
    FinishReason,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    StreamEvent,
)

from engine_helpers import QV_TARGETS, hf_model, make_adapter

# peft asks transformers for `is_gradient_checkpointing`, which transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def backend() -> Iterator[AsyncEngine]:
    b = load_backend("random:tiny", EngineConfig(max_num_seqs=16, threads=1))
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def offline() -> Any:
    return load_engine("random:tiny", EngineConfig(threads=1))


@pytest.fixture(scope="module")
def adapter_dir(backend: AsyncEngine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    info = backend.info
    hidden, q_size = info.lora_shapes["q_proj"]
    kv_size = info.lora_shapes["k_proj"][1]
    cfg = backend.engine.cfg
    base = hf_model(seed=0, vocab_size=info.vocab_size, hidden_size=hidden,
                    intermediate_size=cfg.intermediate_size, num_hidden_layers=info.num_layers,
                    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim)
    assert q_size == cfg.q_size and kv_size == cfg.kv_size
    return make_adapter(base, tmp_path_factory.mktemp("tiny-adapter") / "a", seed=3, r=8, targets=QV_TARGETS,
                        lora_alpha=16, std=0.3)


async def _collect(stream: AsyncIterator[StreamEvent], timeout_s: float = 60.0) -> list[StreamEvent]:
    async def drain() -> list[StreamEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), timeout_s)  # a dead step thread fails the test, never hangs it


async def _eventually(check: Any, timeout_s: float = 20.0) -> None:
    """Wait until `check()` holds (the step thread publishes stats after each step)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def _idle(backend: AsyncEngine) -> bool:
    s = backend.stats()
    return s["running"] == 0 and s["kv_blocks_used"] == 0 and s["queue_depth"] == 0


async def test_stream_text_and_usage(backend: AsyncEngine, offline: Any) -> None:
    engine, tokenizer = offline
    prompt = backend.encode(backend.render_chat([ChatMessage("user", "Tell me a story about a dragon.")]))
    assert prompt == tokenizer.encode(
        tokenizer.chat_template.render([ChatMessage("user", "Tell me a story about a dragon.")]))
    events = await _collect(backend.generate("story", prompt, GREEDY))
    *body, last = events
    assert last.finish_reason is FinishReason.LENGTH and last.error is None
    assert all(e.finish_reason is None for e in body)
    assert all(e.prompt_tokens == len(prompt) for e in events)
    assert [e.completion_tokens for e in events] == list(range(1, 21))
    ids = engine.generate([prompt], GREEDY)[0]
    assert "".join(e.text for e in events) == tokenizer.decode(ids, skip_special_tokens=True)


async def test_sampled_stream_matches_the_offline_engine(backend: AsyncEngine, offline: Any) -> None:
    engine, tokenizer = offline
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=77, ignore_eos=True)
    prompt = backend.encode("The weather today is")
    events = await _collect(backend.generate("seeded", prompt, params))
    assert "".join(e.text for e in events) == tokenizer.decode(engine.generate([prompt], params)[0])


async def test_events_carry_the_logprobs_asked_for(backend: AsyncEngine, offline: Any) -> None:
    """Each token's logprobs with the event of its step, the prompt's whole with the first; every token
    named by its bytes. The offline engine's step outputs are the oracle (test_logprobs.py checks those
    against transformers)."""
    engine, tokenizer = offline
    names = TokenBytes(tokenizer)
    prompt = backend.encode("Once upon a time, in a faraway land,")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    events = await _collect(backend.generate("scored", prompt, params))
    assert [len(e.logprobs) for e in events] == [1] * 5
    assert events[0].prompt_logprobs is not None and all(e.prompt_logprobs is None for e in events[1:])
    seq = engine.add_request("scored", prompt, params)
    outs = [out for _ in range(64) if engine.has_work() for out in engine.step() if out.seq is seq]
    assert outs[0].prompt_scores is not None and len(outs[0].prompt_scores) == len(prompt) - 1
    first, *rest = events[0].prompt_logprobs
    assert (first.token_id, first.token, first.logprob, first.top) == (prompt[0], names(prompt[0]), None, ())
    for got, want in [*zip(rest, outs[0].prompt_scores, strict=True),
                      *((e.logprobs[0], o.logprobs) for e, o in zip(events, outs, strict=True))]:
        assert want is not None
        assert (got.token_id, got.logprob) == (want.ids[0], want.logprobs[0])
        assert [(t.token_id, t.logprob) for t in got.top] == list(zip(want.ids[1:], want.logprobs[1:],
                                                                      strict=True))
        assert got.token == names(got.token_id) and all(t.token == names(t.token_id) for t in got.top)
    # max_tokens 0: one event, the end, with the prompt's logprobs and no text.
    [only] = await _collect(backend.generate("zero", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0)))
    assert only.finish_reason is FinishReason.LENGTH and only.text == "" and only.completion_tokens == 0
    assert only.prompt_logprobs is not None and len(only.prompt_logprobs) == len(prompt)
    assert [p.logprob for p in only.prompt_logprobs[1:]] == [p.logprob for p in rest]
    assert all(p.top == () for p in only.prompt_logprobs)


async def test_closing_the_stream_early_aborts(backend: AsyncEngine) -> None:
    """A consumer that goes away frees the request at once. A witness request runs in the same batch,
    so its events measure engine steps: long before either could finish, only the witness is left."""
    prompt = backend.encode("Count to one thousand:")
    long = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    witness: Any = backend.generate("witness", prompt, long)
    stream: Any = backend.generate("early", prompt, long)
    seen = 0
    async with contextlib.aclosing(stream):
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
    async with contextlib.aclosing(witness):
        for _ in range(60):
            event = await asyncio.wait_for(anext(witness), 30)
            assert event.finish_reason is None
        stats = backend.stats()
        assert stats["running"] == 1 and stats["queue_depth"] == 0
    await _eventually(lambda: _idle(backend))
    assert backend.stats()["kv_blocks_used"] == 0


async def test_a_stream_closed_before_its_first_read_aborts(backend: AsyncEngine) -> None:
    """Closing a stream that was never read (an async generator would skip its `finally`) aborts it too:
    a witness started after it finishes 30 tokens while the closed one would have needed 1500."""
    prompt = backend.encode("Nobody reads this")
    unread = backend.generate("unread", prompt,
                              SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
    await unread.aclose()  # type: ignore[attr-defined]
    witness = await _collect(backend.generate("unread-witness", prompt,
                                              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    assert witness[-1].finish_reason is FinishReason.LENGTH
    assert "unread" not in backend._streams
    assert [e async for e in unread] == []
    await _eventually(lambda: _idle(backend))


async def test_abort_by_request_id(backend: AsyncEngine) -> None:
    prompt = backend.encode("Say something long")
    stream = backend.generate("to-abort", prompt,
                              SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
    first = await anext(stream)
    assert first.finish_reason is None
    backend.abort("to-abort")
    rest = await _collect(stream)
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert len(rest) < 1499
    backend.abort("to-abort")  # unknown by now: ignored
    backend.abort("never-existed")
    await _eventually(lambda: _idle(backend))


async def test_many_concurrent_requests_complete(backend: AsyncEngine) -> None:
    prompts = [backend.encode(f"Request number {i} asks about topic {i % 3}") for i in range(24)]
    params = [SamplingParams(max_tokens=4 + i % 7, temperature=0, ignore_eos=True) for i in range(24)]
    results = await asyncio.gather(*(_collect(backend.generate(f"c{i}", p, sp))
                                     for i, (p, sp) in enumerate(zip(prompts, params, strict=True))))
    for i, events in enumerate(results):
        assert events[-1].finish_reason is FinishReason.LENGTH
        assert events[-1].completion_tokens == params[i].max_tokens
    # Same prompt and greedy settings give the same text whatever else shared the batch.
    same = await asyncio.gather(*(_collect(backend.generate(f"s{i}", prompts[0], params[0]))
                                  for i in range(5)))
    texts = {"".join(e.text for e in events) for events in [*same, results[0]]}
    assert len(texts) == 1
    await _eventually(lambda: _idle(backend))


async def test_prompt_over_the_context_window_raises_synchronously(backend: AsyncEngine) -> None:
    window = backend.info.context_window
    with pytest.raises(ValueError):
        backend.generate("too-long", [1] * (window - 10), SamplingParams(max_tokens=20))
    assert backend.stats()["queue_depth"] == 0


def test_admit_refuses_what_generate_would(backend: AsyncEngine) -> None:
    window = backend.info.context_window
    with pytest.raises(PromptTooLong) as refused:
        backend.admit(window - 10, 20)
    assert (refused.value.needed, refused.value.window) == (window + 10, window)
    backend.admit(window - 20, 20)  # exactly the window fits


async def test_duplicate_request_id_raises(backend: AsyncEngine) -> None:
    first = backend.generate("dup", [1, 2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    with pytest.raises(ValueError):
        backend.generate("dup", [1, 2], SamplingParams(max_tokens=2))
    events = await _collect(first)
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 200


async def test_adapters_and_a_broken_adapter(backend: AsyncEngine, adapter_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    prompt = backend.encode("Hello there")
    good = AdapterRef("tiny-good", str(adapter_dir))
    bad = AdapterRef("tiny-broken", str(broken))
    with_adapter, with_broken, plain = await asyncio.gather(
        _collect(backend.generate("ad-good", prompt, GREEDY, good)),
        _collect(backend.generate("ad-bad", prompt, GREEDY, bad)),
        _collect(backend.generate("ad-none", prompt, GREEDY)),
    )
    assert with_adapter[-1].finish_reason is FinishReason.LENGTH and with_adapter[-1].completion_tokens == 20
    assert plain[-1].finish_reason is FinishReason.LENGTH
    assert "".join(e.text for e in with_adapter) != "".join(e.text for e in plain)
    assert with_broken[-1].finish_reason is FinishReason.ERROR and with_broken[-1].error
    assert with_broken[-1].completion_tokens == 0
    await _eventually(lambda: backend.stats()["adapters_host"] >= 1 and _idle(backend))
    backend.forget_adapter("tiny-good")
    await _eventually(lambda: backend.stats()["adapters_host"] == 0
                      and backend.stats()["adapters_device"] == 0)


async def test_the_step_loop_sleeps_while_an_adapter_loads(adapter_dir: Path) -> None:
    """A request whose adapter is still loading leaves the step thread asleep, not stepping in a loop:
    a spinning step thread holds the GIL the loader thread needs (on a GPU machine, loading 17
    Llama-2-7B-shaped adapters next to it took minutes)."""
    b = load_backend("random:tiny", EngineConfig(threads=1))
    try:
        gate = threading.Event()
        b.engine.adapters._loader.submit(gate.wait)  # the loader's one worker is busy; the adapter queues
        with count_steps(b.engine) as counts:
            stream = b.generate("slow-adapter", b.encode("Hi"), GREEDY,
                                AdapterRef("tiny-slow", str(adapter_dir)))
            await asyncio.sleep(0.5)
            stalled_steps = counts.steps
            gate.set()
            events = await _collect(stream)
        assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 20
        # The safety-net timeout (50 ms) allows ~10 steps in 0.5 s; a spinning loop makes thousands.
        assert 1 <= stalled_steps <= 30, stalled_steps
    finally:
        b.shutdown()


async def test_penalised_request_completes_and_spares_its_neighbours(backend: AsyncEngine) -> None:
    prompt = backend.encode("Repeat after me: la la la")
    penalised = SamplingParams(max_tokens=8, temperature=0, presence_penalty=1.0, repetition_penalty=1.2,
                               ignore_eos=True)
    pen, plain = await asyncio.gather(
        _collect(backend.generate("pen", prompt, penalised)),
        _collect(backend.generate("pen-neighbour", prompt, GREEDY)),
    )
    assert plain[-1].finish_reason is FinishReason.LENGTH, plain[-1].error
    assert pen[-1].finish_reason is FinishReason.LENGTH, pen[-1].error


def test_a_stream_whose_event_loop_closed_does_not_stop_the_engine() -> None:
    """A request left in flight on an event loop that then closes (a server loop shut down while the
    backend is shared, as the test servers share one) must not kill the step thread for everyone."""
    own = load_backend("random:tiny", EngineConfig(threads=1))
    try:
        prompt = [1, 2, 3]

        async def orphan() -> None:
            own.generate("orphan", prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))

        asyncio.run(orphan())  # the loop closes while the request still generates

        async def later() -> list[StreamEvent]:
            return await _collect(own.generate("later", prompt, SamplingParams(max_tokens=3, temperature=0)),
                                  timeout_s=8.0)

        events = asyncio.run(later())
        assert events[-1].finish_reason is FinishReason.LENGTH
    finally:
        own.shutdown()


async def test_churn_with_disconnects_refusals_and_preemption_leaks_nothing(adapter_dir: Path) -> None:
    """What the overload run (loraserve loadtest) does to the server, at the engine: more requests than
    batch and queue hold (some refused), two adapters competing for one device slot, a KV cache small
    enough to preempt, and consumers that go away while queued, mid-stream or never read at all.
    Afterwards every block, pin, stream and per-request state is returned."""
    own = load_backend("random:tiny", EngineConfig(max_num_seqs=4, max_queue=6, max_loras=1, kv_cache_bytes=1,
                                                   threads=1))
    preempted = 0
    preempt = own.engine.scheduler._preempt

    def counting_preempt(seq: Any) -> None:
        nonlocal preempted
        preempted += 1
        preempt(seq)

    own.engine.scheduler._preempt = counting_preempt  # type: ignore[method-assign]
    adapters = [None, AdapterRef("churn-a", str(adapter_dir)), AdapterRef("churn-b", str(adapter_dir))]
    outcomes: dict[str, int] = {}

    async def one(i: int) -> None:
        prompt = own.encode(f"request {i} " * (1 + i % 5))
        kind = i % 4
        # Readers generate long enough that two of them outgrow the KV cache (129 blocks): preemption.
        params = SamplingParams(max_tokens=1100 if kind == 0 else (40, 300, 900)[i % 3], temperature=0.5,
                                seed=i, ignore_eos=True)
        try:
            stream = own.generate(f"churn-{i}", prompt, params, adapters[i % 3])
        except QueueFull:
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            return
        async with contextlib.aclosing(stream):
            if kind == 0:  # reads to the end
                events = await _collect(stream)
                assert events[-1].finish_reason is FinishReason.LENGTH, events[-1].error
            elif kind == 1:  # hangs up after a few events
                for _ in range(1 + i % 7):
                    await asyncio.wait_for(anext(stream), 60)
            elif kind == 2:  # gives up while (probably) still queued
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(anext(stream), 0.001 * (i % 5))
            # kind 3: never reads; closing the stream is all it does
        outcomes[str(kind)] = outcomes.get(str(kind), 0) + 1

    try:
        for wave in range(2):
            await asyncio.gather(*(one(wave * 30 + i) for i in range(30)))
        await _eventually(lambda: _idle(own) and own.stats()["adapters_pinned"] == 0)
        engine = own.engine
        assert engine.blocks.num_free == engine.blocks.num_blocks and not any(engine.blocks._refs)
        assert not engine.scheduler.waiting and not engine.scheduler.running
        assert not engine._by_request and not engine.runner._generators
        assert not own._streams and not own._inbox and own._pending_adds == 0
        assert outcomes.get("refused", 0) > 0 and all(outcomes.get(str(k), 0) > 0 for k in range(4)), outcomes
        assert preempted > 0
    finally:
        own.shutdown()

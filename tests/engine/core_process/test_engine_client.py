"""EngineClient, the Backend over an engine process: streams, aborts, local admission, adapters, stats.

One engine process (random:tiny) per module; its outputs are checked against the in-process AsyncEngine
loaded from the same source (same seed, so the same weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.config import EngineConfig
from loraserve.engine.core_process.client import EngineClient
from loraserve.engine.loader import load_backend
from loraserve.registry import synth
from loraserve.types import (
    AdapterRef,
    Backend,
    ChatMessage,
    FinishReason,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    StreamEvent,
)

CONFIG = EngineConfig(max_num_seqs=2, max_queue=4, threads=1)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def client() -> Iterator[EngineClient]:
    c = EngineClient("random:tiny", CONFIG)
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def in_process() -> Iterator[AsyncEngine]:
    b = load_backend("random:tiny", CONFIG)
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def adapter(client: EngineClient,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bytes | None], Path]:
    """adapter(name, weights=None): a PEFT adapter folder for the tiny model (registry/synth.py), with a
    large lora_alpha so that it changes greedy tokens; `weights` replaces its safetensors file."""

    def build(name: str, weights: bytes | None = None) -> Path:
        folder = tmp_path_factory.mktemp(name)
        (folder / "adapter_config.json").write_bytes(synth.adapter_config(8, 512))
        tensors = synth.lora_tensors(client.info, 8, seed=7)
        (folder / "adapter_model.safetensors").write_bytes(weights or synth.encode_safetensors(tensors))
        return folder

    return build


async def _collect(stream: AsyncIterator[StreamEvent], timeout_s: float = 60.0) -> list[StreamEvent]:
    async def drain() -> list[StreamEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), timeout_s)  # a lost engine fails the test, never hangs it


async def _eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def _idle(backend: Backend) -> bool:
    s = backend.stats()
    return s["running"] == 0 and s["kv_blocks_used"] == 0 and s["queue_depth"] == 0


async def _run_both(backends: list[Backend], prompts: list[list[int]], params: SamplingParams,
                    adapter: AdapterRef | None = None) -> list[list[list[StreamEvent]]]:
    """Every prompt on each backend, concurrently: events per backend per prompt."""
    return [list(await asyncio.gather(*(_collect(b.generate(f"{i}-{n}", p, params, adapter))
                                       for n, p in enumerate(prompts))))
            for i, b in enumerate(backends)]


def test_the_api_side_templates_and_tokenizes_as_the_engine(client: EngineClient,
                                                            in_process: AsyncEngine) -> None:
    chat = [ChatMessage("system", "Be brief."), ChatMessage("user", "Tell me a story about a dragon 🐉.")]
    assert client.render_chat(chat) == in_process.render_chat(chat)
    assert client.encode(client.render_chat(chat)) == in_process.encode(in_process.render_chat(chat))
    assert client.info == in_process.info


async def test_streams_equal_the_in_process_engine(client: EngineClient, in_process: AsyncEngine) -> None:
    """Same events, text and logprobs (named by their bytes) included, for greedy requests sharing a batch
    (more than it holds: some queue), and for a seeded sampled one."""
    prompts = [client.encode(f"Request {i} is about topic {i % 3}:") for i in range(CONFIG.max_queue)]
    scored = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    ours, theirs = await _run_both([client, in_process], prompts, scored)
    assert ours == theirs
    assert all(len(events) >= 2 and events[-1].finish_reason is FinishReason.LENGTH for events in ours)
    assert ours[0][0].prompt_logprobs is not None and ours[0][0].logprobs
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_k=50, seed=77, ignore_eos=True)
    ours, theirs = await _run_both([client, in_process], prompts[:2], seeded)
    assert ours == theirs
    [only], [theirs_only] = await _run_both([client, in_process], prompts[:1],
                                            SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert only == theirs_only and only[-1].completion_tokens == 0
    await _eventually(lambda: _idle(client))


async def test_cached_prompt_tokens_cross_the_process_boundary(client: EngineClient,
                                                               in_process: AsyncEngine) -> None:
    """Every event of a request says how many of its prompt tokens the engine's prefix cache served, as
    the in-process engine's do; a session key travels along and changes nothing on one engine."""
    prompt = client.encode("A prompt that fills a few blocks of the KV cache, and then some more. " * 3)
    hit = (len(prompt) - 1) // CONFIG.block_size * CONFIG.block_size
    assert hit >= 2 * CONFIG.block_size
    for backend in (client, in_process):
        runs = [await _collect(backend.generate(f"cached-{i}", prompt, GREEDY, None, "salt", "session-1"))
                for i in range(2)]
        assert [{event.cached_tokens for event in events} for events in runs] == [{0}, {hit}]
    await _eventually(lambda: _idle(client))


async def test_admission_is_decided_locally(client: EngineClient) -> None:
    """Requests sent count as queued at once, before the engine has seen them; once it has (its gauges
    come with each step), the batch holds max_num_seqs and the queue max_queue more."""
    window = client.info.context_window
    prompt = client.encode("Count to one thousand:")
    with pytest.raises(PromptTooLong):
        client.admit(window - 10, 20)
    async with contextlib.AsyncExitStack() as stack:

        def open_stream(request_id: str) -> None:
            stack.push_async_callback(client.generate(request_id, prompt, LONG).aclose)  # type: ignore[attr-defined]

        for i in range(CONFIG.max_queue):
            open_stream(f"fill-{i}")
        # Full at once, unless the engine's reader thread has meanwhile reported some of them running (the
        # batch does not count against the queue); gauges only ever show more running here, so read after.
        full = client.is_full()
        assert full or client.stats()["running"] > 0
        more = CONFIG.max_num_seqs
        while more:  # the rest of a batch and a queue's worth, as the engine makes room
            try:
                open_stream(f"more-{more}")
                more -= 1
            except QueueFull:
                await asyncio.sleep(0.01)
        await _eventually(lambda: (client.stats()["running"], client.stats()["queue_depth"])
                          == (CONFIG.max_num_seqs, CONFIG.max_queue))
        assert client.is_full()
        with pytest.raises(QueueFull):
            client.generate("refused", prompt, GREEDY)
        with pytest.raises(PromptTooLong):  # the window is checked first, as the engine orders them
            client.admit(window - 10, 20)
        with pytest.raises(QueueFull):
            client.admit(len(prompt), 4)
    await _eventually(lambda: _idle(client) and not client.is_full())


async def test_abort_and_closing_a_stream(client: EngineClient) -> None:
    prompt = client.encode("Say something long")
    stream = client.generate("to-abort", prompt, LONG)
    assert (await asyncio.wait_for(anext(stream), 30)).finish_reason is None
    client.abort("to-abort")
    rest = await _collect(stream)
    assert rest[-1].finish_reason is FinishReason.ABORT and len(rest) < 1499
    client.abort("to-abort")  # unknown by now: ignored
    unread = client.generate("unread", prompt, LONG)
    await unread.aclose()  # type: ignore[attr-defined]
    witness = await _collect(client.generate("witness", prompt, GREEDY))
    assert witness[-1].finish_reason is FinishReason.LENGTH
    await _eventually(lambda: _idle(client))


async def test_duplicate_ids_and_long_prompts_are_refused_synchronously(client: EngineClient) -> None:
    first = client.generate("dup", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="duplicate"):
        client.generate("dup", [1, 2], GREEDY)
    assert (await _collect(first))[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(PromptTooLong):
        client.generate("too-long", [1] * (client.info.context_window - 10), GREEDY)


async def test_adapters_a_broken_one_and_forgetting(client: EngineClient, in_process: AsyncEngine,
                                                    adapter: Callable[[str, bytes | None], Path]) -> None:
    prompt = client.encode("Hello there")
    good = AdapterRef("tiny-good", str(adapter("good", None)))
    broken = AdapterRef("tiny-broken", str(adapter("broken", b"garbage")))
    [[with_adapter], [theirs]] = await _run_both([client, in_process], [prompt], GREEDY, good)
    [[plain]] = await _run_both([client], [prompt], GREEDY)
    assert with_adapter == theirs and with_adapter[-1].completion_tokens == GREEDY.max_tokens
    assert "".join(e.text for e in with_adapter) != "".join(e.text for e in plain)
    failed = await _collect(client.generate("with-broken", prompt, GREEDY, broken))
    assert failed[-1].finish_reason is FinishReason.ERROR and failed[-1].error
    await _eventually(lambda: client.stats()["adapters_host"] >= 1 and _idle(client))
    client.forget_adapter("tiny-good")
    await _eventually(lambda: client.stats()["adapters_host"] == 0 and client.stats()["adapters_device"] == 0)


def test_a_stream_whose_event_loop_closed_is_aborted(client: EngineClient) -> None:
    """A request left in flight on an event loop that then closes frees its slot in the engine."""

    async def orphan() -> None:
        client.generate("orphan", [1, 2, 3], LONG)

    asyncio.run(orphan())

    async def later() -> None:
        events = await _collect(client.generate("after-orphan", [1, 2, 3], GREEDY), timeout_s=20)
        assert events[-1].finish_reason is FinishReason.LENGTH
        await _eventually(lambda: _idle(client))

    asyncio.run(later())


def test_stats_come_from_the_last_snapshot(client: EngineClient) -> None:
    stats: dict[str, Any] = client.stats()
    assert stats["kv_blocks_total"] > 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    stats["running"] = 99.0  # a copy: the caller cannot change the client's
    assert client.stats()["running"] == 0

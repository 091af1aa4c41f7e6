"""Prefix caching in the engine: prompts that share a prefix reuse its K/V, outputs do not change,
the cache is scoped by adapter and salt (the server's account), and each request knows how many of its
prompt tokens the cache served."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from loraserve.engine.core.sequence import Sequence
from loraserve.engine.llm_engine import LLMEngine
from loraserve.types import AdapterRef, SamplingParams

from engine_helpers import build_engine, hf_greedy, hf_model, make_adapter

PREFIX_LEN = 37  # nine full blocks of 4 and one token more
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True)
          for s in range(5)]


@pytest.fixture(scope="module")
def base() -> Any:
    return hf_model(seed=5)


def _shared_prefix_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 256, (PREFIX_LEN,), generator=g).tolist()
    return [prefix + torch.randint(3, 256, (1 + 3 * i,), generator=g).tolist() for i in range(n)]


def _waves(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
           salts: list[str | None] | None = None) -> list[list[int]]:
    """The first prompt alone (it fills the cache), then the rest together."""
    salts = salts or [None] * len(prompts)
    first = engine.add_request("w0", prompts[0], params[0], cache_salt=salts[0])
    while engine.has_work():
        engine.step()
    rest = [engine.add_request(f"w{i}", p, sp, cache_salt=salt)
            for i, (p, sp, salt) in enumerate(zip(prompts[1:], params[1:], salts[1:], strict=True), start=1)]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in (first, *rest)]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_cached_prefixes_change_no_output(base: Any, sampling: str) -> None:
    prompts = _shared_prefix_prompts(5)
    params = [GREEDY] * 5 if sampling == "greedy" else SEEDED
    cached = build_engine(base)
    uncached = build_engine(base, prefix_caching=False)
    outputs = _waves(cached, prompts, params)
    assert outputs == _waves(uncached, prompts, params)
    # Four later prompts each took the nine full blocks of the shared prefix from the cache.
    assert cached.stats()["prefix_cache_hit_tokens"] == 4 * 36
    assert uncached.stats()["prefix_cache_hit_tokens"] == 0
    assert cached.blocks.num_used == 0 and cached.stats()["kv_blocks_cached"] > 0
    if sampling == "greedy":
        assert outputs[2] == hf_greedy(base, prompts[2], 12)


def test_salts_do_not_share(base: Any) -> None:
    prompts = _shared_prefix_prompts(3)
    engine = build_engine(base)
    _waves(engine, prompts, [GREEDY] * 3, salts=["alice", "bob", "alice"])
    assert engine.stats()["prefix_cache_hit_tokens"] == 36  # only Alice's second request


def test_a_preempted_request_resumes_from_its_cached_blocks(base: Any) -> None:
    prompts = _shared_prefix_prompts(5)
    # Room for one 64-token window plus a block: the five cannot all run at once, even sharing a prefix.
    engine = build_engine(base, context_window=64, kv_cache_bytes=1, max_num_batched_tokens=32)
    seqs = [engine.add_request(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    reference = build_engine(base, prefix_caching=False).generate(prompts, GREEDY)
    assert [s.output_ids for s in seqs] == reference
    assert engine.blocks.num_used == 0


def _serve(engine: LLMEngine, request_id: str, prompt: list[int], adapter: AdapterRef | None = None,
           params: SamplingParams = GREEDY) -> Sequence:
    """One request run to its end, alone."""
    seq = engine.add_request(request_id, prompt, params, adapter)
    while engine.has_work():
        engine.step()
        if engine.stalled:
            time.sleep(0.001)  # its adapter is loading on the loader's thread
    return seq


def test_each_request_reports_the_prompt_tokens_served_from_the_cache(base: Any) -> None:
    first, second = _shared_prefix_prompts(2)
    engine = build_engine(base)
    assert _serve(engine, "first", first).num_cached_prompt == 0
    assert _serve(engine, "second", second).num_cached_prompt == 36  # the nine shared full blocks
    # `second` filed ten full blocks; its first 40 tokens again take nine: the last token's logits are
    # wanted, so its block is computed.
    assert _serve(engine, "again", second[:40]).num_cached_prompt == 36
    uncached = build_engine(base, prefix_caching=False)
    assert [_serve(uncached, f"u{i}", first).num_cached_prompt for i in range(2)] == [0, 0]


# peft asks transformers for `is_gradient_checkpointing`, which transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_cached_prompt_tokens_are_counted_per_adapter(base: Any, tmp_path: Path) -> None:
    prompt = _shared_prefix_prompts(1)[0]
    one, two = (AdapterRef(name, str(make_adapter(base, tmp_path / name, seed=seed, r=4,
                                                  targets=("q_proj", "v_proj"))))
                for seed, name in ((1, "ft-one"), (2, "ft-two")))
    engine = build_engine(base)
    served = [_serve(engine, f"r{i}", prompt, adapter).num_cached_prompt
              for i, adapter in enumerate((one, one, two, None, None))]
    # A hit only under the same adapter: another's K/V (or the base model's) differ from its own.
    assert served == [0, 36, 0, 0, 36]

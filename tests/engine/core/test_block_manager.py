"""The KV block bookkeeping (pure Python, no tensors)."""

from __future__ import annotations

import pytest

from loraserve.engine.core.block_manager import BlockManager
from loraserve.engine.core.sequence import Sequence, TokenScores
from loraserve.types import SamplingParams


def _seq(n: int = 1) -> Sequence:
    return Sequence("r", list(range(1, n + 1)), SamplingParams())


@pytest.mark.parametrize(("tokens", "blocks"),
                         [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (100, 25)])
def test_blocks_for_rounds_up(tokens: int, blocks: int) -> None:
    assert BlockManager(10, 4).blocks_for(tokens) == blocks


def test_rejects_empty_cache() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_grow_allocates_only_missing_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(10)
    assert bm.extra_blocks(seq, 10) == 3
    bm.grow(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_used == 3 and bm.num_free == 5
    seq.num_computed = 10
    # Two more tokens still fit the third block (slots 10, 11); a third more needs a fourth block.
    assert bm.extra_blocks(seq, 2) == 0
    bm.grow(seq, 2)
    assert len(seq.block_table) == 3
    assert bm.extra_blocks(seq, 3) == 1
    bm.grow(seq, 3)
    assert len(seq.block_table) == 4 and bm.num_used == 4
    assert len(set(seq.block_table)) == 4  # distinct physical blocks


def test_chunked_growth_equals_one_shot_growth() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = _seq(23)
    for chunk in (5, 5, 5, 5, 3):
        bm.grow(seq, chunk)
        seq.num_computed += chunk
    assert len(seq.block_table) == bm.blocks_for(23) == 6


def test_can_grow_and_grow_without_room() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = _seq(8), _seq(1)
    assert bm.can_grow(a, 8)
    bm.grow(a, 8)
    assert bm.num_free == 0
    assert not bm.can_grow(b, 1)
    with pytest.raises(RuntimeError):
        bm.grow(b, 1)
    assert b.block_table == [] and bm.num_used == 2  # a failed grow takes nothing


def test_free_returns_blocks_and_resets_the_sequence() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = _seq(5), _seq(4)
    bm.grow(a, 5)
    bm.grow(b, 4)
    a.num_computed = 5
    assert bm.num_used == 5
    a_blocks = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and a.num_computed == 0
    assert bm.num_used == 2 and bm.num_free == 4
    # Freed blocks are handed out again (most recently freed first), never b's.
    c = _seq(6)
    bm.grow(c, 6)
    assert set(c.block_table) == set(a_blocks)
    assert not set(c.block_table) & set(b.block_table)
    bm.free(b)
    bm.free(c)
    assert bm.num_free == 6
    # Every block is back exactly once.
    d = _seq(12)
    bm.grow(d, 12)
    assert sorted(d.block_table) == list(range(6))


def test_free_of_a_sequence_without_blocks_is_harmless() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = _seq(2)
    bm.free(seq)
    bm.free(seq)
    assert bm.num_free == 3


def _computed(bm: BlockManager, tokens: list[int], salt: str | None = None,
              adapter: str | None = None) -> Sequence:
    """A sequence whose prompt has been computed and filed, as after its prefill step."""
    seq = Sequence("r", tokens, SamplingParams(), adapter, cache_salt=salt)
    bm.reuse_prefix(seq)
    bm.grow(seq, seq.num_uncomputed)
    seq.num_computed = seq.num_tokens
    bm.cache_computed(seq)
    return seq


def test_a_shared_prefix_is_taken_from_the_cache() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _computed(bm, list(range(10)))  # blocks 0..1 full and filed, block 2 half
    assert bm.num_cached == 2
    again = Sequence("r2", [*range(8), 99, 98, 97], SamplingParams())
    assert bm.reuse_prefix(again) == 8
    assert again.block_table == first.block_table[:2] and again.num_computed == 8
    assert bm.num_used == 3  # the two shared blocks are counted once


def test_the_last_token_is_always_computed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    _computed(bm, list(range(8)))
    same = Sequence("r2", list(range(8)), SamplingParams())
    assert bm.reuse_prefix(same) == 4  # not 8: the step needs the last token's logits
    assert same.num_uncomputed == 4


def test_positions_still_to_score_are_never_taken_from_the_cache() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    _computed(bm, list(range(12)))
    scored = Sequence("r2", list(range(12)), SamplingParams(prompt_logprobs=1))
    assert scored.first_logits == 0 and bm.reuse_prefix(scored) == 0  # position 0 scores token 1
    bm.free(scored)
    assert scored.prompt_scores is not None
    # Preempted after its first chunk scored tokens 1..5: positions 0..4 need no logits any more.
    scored.prompt_scores.extend([TokenScores((1,), (-1.0,))] * 5)
    assert scored.first_logits == 5 and bm.reuse_prefix(scored) == 4
    bm.free(scored)
    scored.prompt_scores.extend([TokenScores((1,), (-1.0,))] * 6)  # the whole prompt is scored
    assert scored.first_logits == 11 and bm.reuse_prefix(scored) == 8


def test_salt_and_adapter_scope_the_cache() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    _computed(bm, list(range(9)), salt="alice", adapter="ft-1")
    for salt, adapter, hit in (("alice", "ft-1", 8), ("bob", "ft-1", 0), ("alice", None, 0),
                               ("alice", "ft-2", 0)):
        seq = Sequence("x", list(range(9)), SamplingParams(), adapter, cache_salt=salt)
        assert bm.reuse_prefix(seq) == hit, (salt, adapter)
        bm.free(seq)


def test_a_prefix_matches_only_from_the_start() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    _computed(bm, list(range(12)))
    shifted = Sequence("r", [100, *range(4, 12), 5], SamplingParams())  # block 1's tokens, not its prefix
    assert bm.reuse_prefix(shifted) == 0
    diverging = Sequence("r", [0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12], SamplingParams())
    assert bm.reuse_prefix(diverging) == 4


def test_freed_cached_blocks_stay_until_their_memory_is_needed() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = _computed(bm, list(range(9)))
    bm.free(seq)
    assert bm.num_used == 0 and bm.num_free == 4 and bm.num_cached == 2
    # Uncached blocks are handed out first: the cached prefix survives a small allocation.
    other = Sequence("o", [50, 51, 52], SamplingParams())
    bm.grow(other, 3)
    assert bm.num_cached == 2
    assert bm.reuse_prefix(Sequence("r2", list(range(9)), SamplingParams())) == 8
    # Memory pressure reclaims cached blocks, deepest first, and drops them from the cache.
    bm2 = BlockManager(num_blocks=3, block_size=4)
    seq = _computed(bm2, list(range(9)))  # 3 blocks: 2 cached + 1 partial
    bm2.free(seq)
    big = Sequence("b", list(range(100, 109)), SamplingParams())
    bm2.grow(big, 8)  # two blocks: the partial one, then the deepest cached one
    assert bm2.num_cached == 1
    assert bm2.reuse_prefix(Sequence("r3", list(range(9)), SamplingParams())) == 4


def test_two_copies_of_one_prefix_keep_the_first_and_free_both() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = Sequence("a", list(range(5)), SamplingParams())
    b = Sequence("b", list(range(5)), SamplingParams())
    for seq in (a, b):  # both admitted before either is computed: both compute block 0
        bm.reuse_prefix(seq)
        bm.grow(seq, 5)
    for seq in (a, b):
        seq.num_computed = 5
        bm.cache_computed(seq)
    assert bm.num_cached == 1 and bm.num_used == 4
    bm.free(a)
    bm.free(b)
    assert bm.num_used == 0 and bm.num_free == 8 and bm.num_cached == 1


def test_prefix_caching_off_reuses_nothing() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
    _computed(bm, list(range(9)))
    assert bm.num_cached == 0
    assert bm.reuse_prefix(Sequence("r", list(range(9)), SamplingParams())) == 0

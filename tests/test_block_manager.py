"""The KV block bookkeeping (pure Python, no tensors)."""

from __future__ import annotations

import pytest

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.sequence import Sequence
from loraserve.types import SamplingParams


def _seq(n: int = 1) -> Sequence:
    return Sequence("r", list(range(1, n + 1)), SamplingParams())


@pytest.mark.parametrize(("tokens", "blocks"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (100, 25)])
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

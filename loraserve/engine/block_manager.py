"""The KV cache's bookkeeping: fixed-size blocks handed to sequences. Pure Python, no tensors.

The cache tensors live in the model runner; a sequence's `block_table[i]` is the physical block that
holds its tokens `i*block_size .. (i+1)*block_size-1`.
"""

from __future__ import annotations

from collections import deque

from loraserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence, num_new: int) -> int:
        """Blocks `seq` still needs so that `num_new` more tokens fit after the computed ones."""
        return max(0, self.blocks_for(seq.num_computed + num_new) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_new: int) -> bool:
        return self.extra_blocks(seq, num_new) <= len(self._free)

    def grow(self, seq: Sequence, num_new: int) -> None:
        need = self.extra_blocks(seq, num_new)
        if need > len(self._free):
            raise RuntimeError("grow() without can_grow(): the scheduler must check first")
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        # Most recently used blocks go to the front so the next allocation finds them warm in cache.
        for block in reversed(seq.block_table):
            self._free.appendleft(block)
        seq.block_table.clear()
        seq.num_computed = 0

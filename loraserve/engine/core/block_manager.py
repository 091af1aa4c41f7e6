"""The KV cache's bookkeeping: fixed-size blocks handed to sequences, and the prefix cache. Pure Python.

The cache tensors live in the model runner; a sequence's `block_table[i]` is the physical block that
holds its tokens `i*block_size .. (i+1)*block_size-1`.

Prefix caching (vLLM's automatic prefix caching, in small): a block whose tokens are all computed is
filed under a hash of its whole prefix, i.e. of every token up to its end, the adapter (a LoRA on q/k/v
changes K and V) and a salt (the server passes the account, so one tenant's cached prompts never
speed up, and so never reveal themselves to, another's). A new request that starts with the same
tokens takes those blocks instead of computing them. Blocks are reference-counted; an unreferenced
block that still holds a cached prefix stays "free" (it is handed out when nothing else is) and is
dropped from the cache only when it is reused. Shared blocks are always full, and a sequence writes
only past its computed tokens, so a shared block is never written: no copy-on-write is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from loraserve.engine.core.sequence import Sequence

_DIGEST_BYTES = 16  # 128-bit BLAKE2b: collisions (one tenant reading another's K/V) are out of reach


def prefix_hashes(seq: Sequence, num_blocks: int, block_size: int) -> list[bytes]:
    """Hashes of `seq`'s first `num_blocks` full blocks, each covering the whole prefix up to its end.

    Cached on the sequence: its tokens only ever grow, so a full block's hash never changes.
    """
    hashes = seq.block_hashes
    parent = hashes[-1] if hashes else _root(seq)
    for i in range(len(hashes), num_blocks):
        tokens = array("q", seq.token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=_DIGEST_BYTES).digest()
        hashes.append(parent)
    return hashes[:num_blocks]


def _root(seq: Sequence) -> bytes:
    scope = f"{seq.cache_salt or ''}\0{seq.adapter_key or ''}".encode()
    return hashlib.blake2b(scope, digest_size=_DIGEST_BYTES).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Unreferenced blocks in the order they are handed out: blocks without a cached prefix first
        # (most recently freed first, warm in the CPU cache), then cached ones, least recently used first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds, cached prefixes included (they are reclaimed on demand)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

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
            block, _ = self._free.popitem(last=False)
            stale = self._hash_of.pop(block, None)
            if stale is not None:
                del self._block_of[stale]
            self._refs[block] = 1
            seq.block_table.append(block)

    def reuse_prefix(self, seq: Sequence) -> int:
        """Give a sequence with nothing computed the cached blocks of its longest cached prefix; returns
        the tokens they hold, now counted as computed. Positions whose logits are wanted are always left
        to compute: the last token's (the step samples from them), and every prompt position still to
        score for a request that asked for its prompt's logprobs."""
        if not self.prefix_caching or seq.num_computed or seq.block_table:
            return 0
        usable = seq.first_logits // self.block_size
        for h in prefix_hashes(seq, usable, self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            seq.block_table.append(block)
        seq.num_computed = len(seq.block_table) * self.block_size
        seq.num_cached_blocks = len(seq.block_table)
        return seq.num_computed

    def cache_computed(self, seq: Sequence) -> None:
        """File `seq`'s newly full, computed blocks under their prefix hashes (after each step)."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_cached_blocks:
            return
        hashes = prefix_hashes(seq, full, self.block_size)
        for i in range(seq.num_cached_blocks, full):
            block = seq.block_table[i]
            # Another sequence may have filed the same prefix first: then this copy stays private.
            if hashes[i] not in self._block_of and block not in self._hash_of:
                self._block_of[hashes[i]] = block
                self._hash_of[block] = hashes[i]
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        # Deepest blocks first: a cached prefix is useless without its start, so its end is reclaimed first.
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:
                    self._free.move_to_end(block, last=False)
        seq.block_table.clear()
        seq.num_computed = 0
        seq.num_cached_blocks = 0

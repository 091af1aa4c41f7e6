"""Continuous batching with chunked prefill, KV admission control and preemption. Pure Python.

Every step gets a token budget. Running decodes go first (one token each, so latency stays flat),
then running prefills continue, then waiting requests join, their prompts cut to what is left of the
budget. When the KV cache cannot grow a running sequence, the most recently admitted one is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later.
So a request that fits the context window never fails for lack of KV memory: it waits.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from loraserve.engine.core.block_manager import BlockManager
from loraserve.engine.core.sequence import Sequence, SequenceStatus
from loraserve.types import FinishReason


class AdapterState(enum.Enum):
    READY = enum.auto()
    LOADING = enum.auto()
    FAILED = enum.auto()


class AdapterGate(Protocol):
    """The scheduler's view of the adapter cache."""

    def state(self, key: str) -> AdapterState:
        """READY once the adapter is in host memory; asking starts a background load."""
        ...

    def pin(self, key: str) -> bool:
        """Give `key` a device slot and pin it; False when every slot is pinned by running requests."""
        ...

    def unpin(self, key: str) -> None: ...


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens whose K/V this step computes

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so the step samples its next one."""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # their adapter could not be loaded
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 gate: AdapterGate | None = None, max_waiting: int | None = None) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.gate = gate
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Prompt tokens admitted from the prefix cache instead of computed, since start. Counted at
        # admission: a request that takes its cached blocks and then has to wait gives them back.
        self.prefix_hit_tokens = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def is_full(self) -> bool:
        return self.max_waiting is not None and len(self.waiting) >= self.max_waiting

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decodes first, then running prefill chunks: both in admission order.
        for want_decode in (True, False):
            for seq in list(self.running):
                if budget == 0 or seq.status is not SequenceStatus.RUNNING:
                    continue
                if (seq.num_uncomputed == 1) != want_decode or seq.num_uncomputed == 0:
                    continue
                num_new = min(seq.num_uncomputed, budget)
                if not self._make_room(seq, num_new, out):
                    continue
                self.blocks.grow(seq, num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        if out.num_preempted == 0:
            budget = self._admit(budget, out)
        return out

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until `seq` can grow; False if `seq` itself went."""
        while not self.blocks.can_grow(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            out.num_preempted += 1
            out.scheduled = [s for s in out.scheduled if s.seq is not victim]
            if victim is seq:
                return False
        return True

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        passed: list[Sequence] = []  # waiting on an adapter load: later requests may go ahead
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            key = seq.adapter_key
            if key is not None and self.gate is not None:
                state = self.gate.state(key)
                if state is AdapterState.FAILED:
                    seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ERROR
                    out.failed.append(seq)
                    continue
                if state is AdapterState.LOADING:
                    passed.append(seq)
                    continue
            # A cached prompt prefix is neither computed nor allocated again.
            reused = self.blocks.reuse_prefix(seq)
            num_new = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, num_new):
                self.blocks.free(seq)
                self.waiting.appendleft(seq)  # FCFS on memory: nobody jumps a request waiting for blocks
                break
            if key is not None and self.gate is not None and not self.gate.pin(key):
                self.blocks.free(seq)
                passed.append(seq)  # every adapter slot pinned; requests for resident adapters may pass
                continue
            self.blocks.grow(seq, num_new)
            self.prefix_hit_tokens += reused
            if seq.num_preemptions == 0:  # only a preemption puts a sequence back in the queue
                seq.num_cached_prompt = reused
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(passed))
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        if seq.adapter_key is not None and self.gate is not None:
            self.gate.unpin(seq.adapter_key)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Release everything `seq` holds; safe for waiting, running or already finished sequences."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            if seq.adapter_key is not None and self.gate is not None:
                self.gate.unpin(seq.adapter_key)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = reason

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

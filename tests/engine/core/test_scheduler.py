"""The scheduler (pure Python): token budget, chunked prefill, KV admission, preemption, adapter gating.

The AdapterGate here is a small real implementation on top of the real SlotTable; `run_step` plays
the model runner's part (marks the scheduled tokens computed and appends a token where one is sampled).
"""

from __future__ import annotations

import pytest

from loraserve.engine.core.adapter_slots import SlotTable
from loraserve.engine.core.block_manager import BlockManager
from loraserve.engine.core.scheduler import AdapterState, Scheduler, SchedulerOutput
from loraserve.engine.core.sequence import Sequence, SequenceStatus
from loraserve.types import FinishReason, SamplingParams


class SlotGate:
    """Adapters are READY unless told otherwise; pins go through a real SlotTable."""

    def __init__(self, num_slots: int) -> None:
        self.table = SlotTable(num_slots)
        self.states: dict[str, AdapterState] = {}
        self.asked: list[str] = []

    def state(self, key: str) -> AdapterState:
        self.asked.append(key)
        return self.states.get(key, AdapterState.READY)

    def pin(self, key: str) -> bool:
        return self.table.acquire(key) is not None

    def unpin(self, key: str) -> None:
        self.table.release(key)


def _seq(rid: str, n: int, adapter: str | None = None) -> Sequence:
    return Sequence(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=1000), adapter)


def run_step(out: SchedulerOutput) -> None:
    for s in out.scheduled:
        samples = s.samples
        s.seq.num_computed += s.num_new
        if samples:
            s.seq.append(7)


def _plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new) for s in out.scheduled]


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), max_num_seqs=0, max_num_batched_tokens=8)
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), max_num_seqs=1, max_num_batched_tokens=0)


def test_prefill_is_chunked_to_the_token_budget() -> None:
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    a = _seq("a", 20)
    sch.add(a)
    plans = []
    for _ in range(3):
        out = sch.schedule()
        plans.append(_plan(out))
        assert [s.samples for s in out.scheduled] == [len(plans) == 3]
        run_step(out)
    assert plans == [[("a", 8)], [("a", 8)], [("a", 4)]]
    assert a.num_computed == 20 and a.num_output == 1
    assert len(a.block_table) == 5  # blocks grow with the chunks, never ahead of them
    assert _plan(sch.schedule()) == [("a", 1)]  # now a decode


def test_decodes_go_first_then_running_prefills_then_new_requests() -> None:
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = _seq("a", 3), _seq("b", 4)
    sch.add(a)
    sch.add(b)
    run_step(sch.schedule())  # a: 3, b: 4 -> both sampled, both decode next
    c = _seq("c", 12)
    sch.add(c)
    out = sch.schedule()
    # Two decodes (1 token each) and c's first chunk in what is left of the budget.
    assert _plan(out) == [("a", 1), ("b", 1), ("c", 8)]
    assert out.num_tokens == 10
    run_step(out)
    d = _seq("d", 5)
    sch.add(d)
    out = sch.schedule()
    # Decodes, then c's running prefill continues before d joins.
    assert _plan(out) == [("a", 1), ("b", 1), ("c", 4), ("d", 4)]
    run_step(out)
    out = sch.schedule()
    assert _plan(out) == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]


def test_budget_is_respected_even_by_decodes() -> None:
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=4)
    seqs = [_seq(f"s{i}", 1) for i in range(6)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert _plan(out) == [("s0", 1), ("s1", 1), ("s2", 1), ("s3", 1)]
    run_step(out)
    out = sch.schedule()
    # Four running decodes fill the budget: they go in admission order, nobody else joins.
    assert _plan(out) == [("s0", 1), ("s1", 1), ("s2", 1), ("s3", 1)]
    assert [s.request_id for s in sch.waiting] == ["s4", "s5"]
    run_step(out)
    sch.finish(seqs[1], FinishReason.STOP)
    out = sch.schedule()
    assert _plan(out) == [("s0", 1), ("s2", 1), ("s3", 1), ("s4", 1)]


def test_max_num_seqs_limits_the_running_batch() -> None:
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [_seq(f"s{i}", 3) for i in range(4)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert _plan(out) == [("s0", 3), ("s1", 3)]
    assert [s.request_id for s in sch.waiting] == ["s2", "s3"]
    run_step(out)
    sch.finish(seqs[0], FinishReason.STOP)
    out = sch.schedule()
    assert _plan(out) == [("s1", 1), ("s2", 3)]
    assert len(sch.running) == 2


def test_admission_is_fcfs_and_stops_when_kv_blocks_run_out() -> None:
    sch = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = _seq("a", 12), _seq("b", 8), _seq("c", 2)
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    # a takes 3 of 4 blocks; b needs 2, so admission stops: c would fit but must not jump b.
    assert _plan(out) == [("a", 12)]
    assert [s.request_id for s in sch.waiting] == ["b", "c"]
    assert b.block_table == [] and c.block_table == []
    assert sch.blocks.num_free == 1
    sch.finish(a, FinishReason.STOP)
    assert _plan(sch.schedule()) == [("b", 8), ("c", 2)]


def test_preemption_takes_the_newest_running_sequence() -> None:
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq("a", 8), _seq("b", 7)
    sch.add(a)
    sch.add(b)
    run_step(sch.schedule())  # a: 8 prompt + 1 out (needs block 3 next), b: 7 + 1 (fits its 2nd block)
    assert bm.num_free == 0
    waiting = _seq("w", 1)
    sch.add(waiting)
    out = sch.schedule()
    # a's decode needs a third block: b (the newest) goes; b's own decode is dropped from the step.
    assert out.num_preempted == 1
    assert _plan(out) == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert b.num_preemptions == 1 and b.num_output == 1  # it keeps its output, recomputed later
    assert list(sch.waiting) == [b, waiting]  # at the front of the queue
    assert sch.running == [a]
    # No admission in a step that preempted.
    assert waiting.status is SequenceStatus.WAITING
    run_step(out)
    sch.finish(a, FinishReason.STOP)
    out = sch.schedule()
    # b comes back first and recomputes prompt + output in one go, then samples its next token.
    assert _plan(out) == [("b", 8), ("w", 1)]
    assert out.scheduled[0].samples


def test_a_sequence_that_is_itself_the_newest_preempts_itself() -> None:
    bm = BlockManager(3, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, c = _seq("a", 3), _seq("c", 8)
    sch.add(a)
    sch.add(c)
    run_step(sch.schedule())  # a: 1 block (its decode still fits), c: 2 blocks (its decode needs a 3rd)
    assert bm.num_free == 0
    out = sch.schedule()
    # c is the newest: making room for c preempts c itself, and a still decodes.
    assert _plan(out) == [("a", 1)] and out.num_preempted == 1
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and list(sch.waiting) == [c]
    assert sch.running == [a] and bm.num_used == 1


def test_loading_adapter_is_passed_by_later_requests() -> None:
    gate = SlotGate(4)
    gate.states["slow"] = AdapterState.LOADING
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100, gate=gate)
    a, b, c = _seq("a", 3, "slow"), _seq("b", 3, "fast"), _seq("c", 3)
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    assert _plan(out) == [("b", 3), ("c", 3)]
    assert list(sch.waiting) == [a] and a.status is SequenceStatus.WAITING
    assert "slow" in gate.asked
    assert gate.table.pins("fast") == 1 and "slow" not in gate.table
    gate.states["slow"] = AdapterState.READY
    out = sch.schedule()
    assert ("a", 3) in _plan(out)
    assert gate.table.pins("slow") == 1


def test_passed_requests_keep_their_order_at_the_front() -> None:
    gate = SlotGate(4)
    gate.states["slow"] = AdapterState.LOADING
    sch = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100, gate=gate)
    seqs = [_seq("a", 2, "slow"), _seq("b", 2, "slow"), _seq("c", 2), _seq("d", 2), _seq("e", 2)]
    for s in seqs:
        sch.add(s)
    assert _plan(sch.schedule()) == [("c", 2), ("d", 2)]
    assert [s.request_id for s in sch.waiting] == ["a", "b", "e"]


def test_failed_adapter_finishes_its_requests_with_error() -> None:
    gate = SlotGate(4)
    gate.states["broken"] = AdapterState.FAILED
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, gate=gate)
    a, b, c = _seq("a", 3, "broken"), _seq("b", 3), _seq("c", 5, "broken")
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    assert out.failed == [a, c]
    assert _plan(out) == [("b", 3)]
    for s in (a, c):
        assert s.status is SequenceStatus.FINISHED and s.finish_reason is FinishReason.ERROR
        assert s.block_table == []
    assert not sch.waiting and sch.running == [b]
    assert "broken" not in gate.table and bm.num_used == 1


def test_a_refused_pin_holds_the_request_back_until_a_slot_frees() -> None:
    gate = SlotGate(1)
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, gate=gate)
    a, b, c = _seq("a", 3, "x"), _seq("b", 3, "y"), _seq("c", 3, "x")
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    # The only slot is pinned by x: b (adapter y) waits, c (adapter x, resident) goes ahead.
    assert _plan(out) == [("a", 3), ("c", 3)]
    assert list(sch.waiting) == [b] and b.block_table == []
    assert gate.table.pins("x") == 2
    run_step(out)
    sch.finish(a, FinishReason.STOP)
    out = sch.schedule()
    assert _plan(out) == [("c", 1)]  # x still pinned by c
    run_step(out)
    sch.finish(c, FinishReason.STOP)
    assert gate.table.pins("x") == 0
    out = sch.schedule()
    assert _plan(out) == [("b", 3)]
    assert gate.table.resident == ["y"]  # x was evicted for y


def test_preemption_releases_the_adapter_pin_and_readmission_pins_again() -> None:
    gate = SlotGate(2)
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, gate=gate)
    a, b = _seq("a", 8, "x"), _seq("b", 7, "y")
    sch.add(a)
    sch.add(b)
    run_step(sch.schedule())
    assert gate.table.num_pinned == 2
    out = sch.schedule()
    assert out.num_preempted == 1 and b.status is SequenceStatus.WAITING
    assert gate.table.pins("y") == 0 and gate.table.pins("x") == 1
    run_step(out)
    sch.finish(a, FinishReason.STOP)
    assert gate.table.num_pinned == 0
    out = sch.schedule()
    assert _plan(out) == [("b", 8)]
    assert gate.table.pins("y") == 1


def test_finish_releases_everything_for_waiting_and_running_sequences() -> None:
    gate = SlotGate(2)
    bm = BlockManager(16, 4)
    sch = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100, gate=gate)
    running, waiting = _seq("r", 6, "x"), _seq("w", 6, "y")
    sch.add(running)
    sch.add(waiting)
    run_step(sch.schedule())
    assert sch.running == [running] and list(sch.waiting) == [waiting]
    assert bm.num_used == 2 and gate.table.pins("x") == 1

    sch.finish(running, FinishReason.ABORT)
    assert sch.running == [] and bm.num_used == 0 and gate.table.pins("x") == 0
    assert running.status is SequenceStatus.FINISHED and running.finish_reason is FinishReason.ABORT

    sch.finish(waiting, FinishReason.ABORT)
    assert not sch.waiting and not sch.has_work()
    assert "y" not in gate.table  # never pinned, so nothing to release
    assert waiting.finish_reason is FinishReason.ABORT

    # Finishing again is harmless and keeps the first reason.
    sch.finish(running, FinishReason.STOP)
    assert running.finish_reason is FinishReason.ABORT and gate.table.num_pinned == 0 and bm.num_used == 0


def test_finish_of_a_preempted_sequence_frees_nothing_twice() -> None:
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _seq("a", 8), _seq("b", 7)
    sch.add(a)
    sch.add(b)
    run_step(sch.schedule())
    out = sch.schedule()
    assert out.num_preempted == 1
    sch.finish(b, FinishReason.ABORT)  # preempted, so waiting at the front
    assert not sch.waiting and b.is_finished
    assert bm.num_used == len(a.block_table) == 3
    sch.finish(a, FinishReason.STOP)
    assert bm.num_free == 4


def test_queue_limit_and_find() -> None:
    sch = Scheduler(BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=100, max_waiting=2)
    a, b = _seq("a", 2), _seq("b", 2)
    sch.add(a)
    assert not sch.is_full()
    sch.add(b)
    assert sch.is_full()
    sch.schedule()  # a starts running, b still waits
    assert not sch.is_full()
    assert sch.find("a") is a and sch.find("b") is b and sch.find("zzz") is None


def test_nothing_to_do() -> None:
    sch = Scheduler(BlockManager(4, 4), max_num_seqs=1, max_num_batched_tokens=4)
    out = sch.schedule()
    assert out.scheduled == [] and out.failed == [] and out.num_tokens == 0 and not sch.has_work()


def test_a_cached_prefix_counts_once_however_often_admission_is_retried() -> None:
    """A waiting request that finds its prefix cached but no room for the rest gives the cached blocks
    back and waits; the prefix-cache hits count only when it is really admitted."""
    sch = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    first = _seq("first", 9)  # fills and files blocks 0 and 1
    sch.add(first)
    run_step(sch.schedule())
    sch.blocks.cache_computed(first)
    hog = _seq("hog", 3)  # takes the last free block (its next token still fits it)
    sch.add(hog)
    run_step(sch.schedule())
    assert sch.blocks.num_free == 0
    again = _seq("again", 13)  # shares first's 8-token prefix, needs 2 more blocks: none free
    sch.add(again)
    for _ in range(3):  # the decodes are scheduled (not run), then `again` tries and gives its blocks back
        out = sch.schedule()
        assert again not in [s.seq for s in out.scheduled] and again.block_table == []
    assert sch.prefix_hit_tokens == 0 and again.num_cached_prompt == 0
    sch.finish(first, FinishReason.STOP)
    sch.finish(hog, FinishReason.STOP)
    out = sch.schedule()
    assert _plan(out) == [("again", 5)]  # 8 tokens came from the cache
    assert sch.prefix_hit_tokens == 8 and again.num_cached_prompt == 8


def test_a_request_reports_the_cached_prompt_tokens_of_its_first_admission() -> None:
    """After a preemption a sequence may find its own blocks still cached: a saving of the engine's (it
    counts them), not of the request's, which reports what its first admission took."""
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = _seq("a", 8)
    b = Sequence("b", list(range(50, 57)), SamplingParams(max_tokens=1000))  # shares nothing with a
    sch.add(a)
    sch.add(b)
    run_step(sch.schedule())  # a: 8 prompt + 1 out, b: 7 + 1; the four blocks are used
    for seq in (a, b):
        bm.cache_computed(seq)  # b files its first block
    out = sch.schedule()  # a's decode needs a third block: b goes
    assert out.num_preempted == 1 and b.num_preemptions == 1
    run_step(out)
    sch.finish(a, FinishReason.STOP)
    out = sch.schedule()
    assert _plan(out) == [("b", 4)]  # its first block came back from the cache
    assert sch.prefix_hit_tokens == 4 and b.num_cached_prompt == 0

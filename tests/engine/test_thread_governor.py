"""The thread governor's policy on synthetic counters, its /proc reader on this machine, and the engine
stepping with the count it sets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_engine
from loraserve.engine.thread_governor import (
    AdaptiveThreads,
    CpuSample,
    GovernorPolicy,
    ProcCounters,
    ThreadGovernor,
)
from loraserve.types import SamplingParams

POLICY = GovernorPolicy(interval_s=0.5, drop_delay=0.1, raise_idle=0.75, raise_after=1, hold_s=2.0,
                        max_hold_s=8.0)


class Clock:
    """Cumulative counters advanced interval by interval: `busy` seconds of run delay and `idle` cores."""

    def __init__(self) -> None:
        self.sample = CpuSample(0.0, 0.0, 0.0)

    def advance(self, seconds: float = 0.5, delay: float = 0.0, idle: float = 0.0) -> CpuSample:
        s = self.sample
        self.sample = CpuSample(s.wall_s + seconds, s.idle_s + idle * seconds, s.delay_s + delay * seconds)
        return self.sample


def test_keeps_every_thread_while_nothing_waits() -> None:
    gov, clock = ThreadGovernor(2, POLICY), Clock()
    assert gov.observe(clock.sample) is None
    for _ in range(20):  # a busy engine alone: no idle core, no run delay
        assert gov.observe(clock.advance(delay=0.01)) is None
    assert gov.threads == 2


def test_gives_up_a_thread_while_its_threads_wait_and_takes_it_back_when_a_core_stays_idle() -> None:
    gov, clock = ThreadGovernor(4, POLICY), Clock()
    gov.observe(clock.sample)
    assert gov.observe(clock.advance(delay=0.3)) == 3
    assert gov.observe(clock.advance(delay=0.3)) == 2
    assert gov.observe(clock.advance(delay=0.05, idle=0.2)) is None  # the others have their core now
    # a core idle again: back, one at a time, not before the hold after the last drop (2 s)
    assert gov.observe(clock.advance(idle=1.0)) is None
    assert gov.observe(clock.advance(idle=1.0)) is None
    assert gov.observe(clock.advance(idle=1.0)) == 3
    assert gov.observe(clock.advance(idle=1.0)) == 4
    assert gov.observe(clock.advance(idle=1.0)) is None  # never beyond the configured count


def test_never_below_one_thread() -> None:
    gov, clock = ThreadGovernor(2, POLICY), Clock()
    gov.observe(clock.sample)
    assert gov.observe(clock.advance(delay=0.9)) == 1
    assert gov.observe(clock.advance(delay=0.9)) is None
    assert gov.threads == 1


def test_a_failed_try_doubles_the_wait_before_the_next() -> None:
    """A load that leaves a core idle only while the engine runs with fewer threads would otherwise make it
    flip every interval: each try that has to be undone at once waits twice as long, up to max_hold_s."""
    gov, clock = ThreadGovernor(2, POLICY), Clock()
    gov.observe(clock.sample)
    assert gov.observe(clock.advance(delay=0.5)) == 1
    waits = []
    for _ in range(4):
        n = 0
        while gov.observe(clock.advance(idle=0.9)) is None:
            n += 1
        assert gov.threads == 2
        waits.append((n + 1) * 0.5)
        assert gov.observe(clock.advance(delay=0.5)) == 1  # contended again at once
    assert waits == [2.0, 4.0, 8.0, 8.0]


def test_a_try_that_holds_resets_the_wait() -> None:
    gov, clock = ThreadGovernor(2, POLICY), Clock()
    gov.observe(clock.sample)
    gov.observe(clock.advance(delay=0.5))
    while gov.observe(clock.advance(idle=0.9)) is None:
        pass
    gov.observe(clock.advance(delay=0.5))  # failed at once: the next wait is 4 s
    while gov.observe(clock.advance(idle=0.9)) is None:
        pass
    for _ in range(10):  # held for 5 s
        assert gov.observe(clock.advance(delay=0.01)) is None
    assert gov.observe(clock.advance(delay=0.5)) == 1
    n = 0
    while gov.observe(clock.advance(idle=0.9)) is None:
        n += 1
    assert (n + 1) * 0.5 == 2.0


def test_takes_a_thread_back_only_after_the_core_stayed_idle_for_raise_after_intervals() -> None:
    gov, clock = ThreadGovernor(2, replace(POLICY, raise_after=4, hold_s=0.5)), Clock()
    gov.observe(clock.sample)
    assert gov.observe(clock.advance(delay=0.5)) == 1
    for _ in range(5):  # bursts: three idle intervals, then a busy one
        for _ in range(3):
            assert gov.observe(clock.advance(idle=1.0)) is None
        assert gov.observe(clock.advance(idle=0.2)) is None
    for _ in range(3):
        assert gov.observe(clock.advance(idle=1.0)) is None
    assert gov.observe(clock.advance(idle=1.0)) == 2


@pytest.mark.parametrize("bad", [dict(interval_s=0), dict(hold_s=5, max_hold_s=1), dict(drop_delay=0),
                                 dict(raise_idle=-1), dict(raise_after=0)])
def test_policy_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GovernorPolicy(**bad)
    with pytest.raises(ValueError):
        ThreadGovernor(0)


def test_proc_counters_read_this_machine() -> None:
    first = ProcCounters().sample()
    if first is None:
        pytest.skip("no /proc/stat or schedstat here")
    sum(i * i for i in range(200_000))
    second = ProcCounters().sample()
    assert second is not None and second.wall_s > first.wall_s
    assert second.idle_s >= first.idle_s and second.delay_s >= first.delay_s


def test_proc_counters_say_none_where_proc_is_not_linux_s(tmp_path: Path) -> None:
    assert ProcCounters(tmp_path).sample() is None
    (tmp_path / "stat").write_text("cpu garbage\n")
    assert ProcCounters(tmp_path).sample() is None


def test_adaptive_threads_applies_the_count_once_an_interval() -> None:
    clock, applied = Clock(), []
    samples = iter([clock.sample, clock.advance(delay=0.5), clock.advance(delay=0.5)])
    threads = AdaptiveThreads(2, applied.append, counters=lambda: next(samples, None),
                              policy=GovernorPolicy(interval_s=1e-6))
    assert threads.enabled  # and the first sample is the baseline
    threads.tick()
    assert applied == [1]
    threads.tick()  # at one thread already
    threads.tick()  # the counters went away: back to the configured count, and no more ticks
    assert applied == [1, 2] and not threads.enabled
    assert threads.governor.threads == 2


def test_unreadable_counters_leave_the_count_alone() -> None:
    applied: list[int] = []
    threads = AdaptiveThreads(2, applied.append, counters=lambda: None)
    threads.tick()
    assert not threads.enabled and applied == []


def test_the_engine_steps_with_the_governed_count_and_reports_it() -> None:
    engine, _ = load_engine("random:tiny", EngineConfig(adaptive_threads=True, threads=2))
    assert engine.threads is not None and engine.stats()["compute_threads"] == 2.0
    clock = Clock()
    samples = iter([clock.sample, clock.advance(delay=0.5)])  # contended from the first interval on
    engine.threads = AdaptiveThreads(2, torch.set_num_threads, counters=lambda: next(samples, clock.sample),
                                     policy=GovernorPolicy(interval_s=1e-6))
    try:
        out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0]) == 4
        assert torch.get_num_threads() == 1 and engine.stats()["compute_threads"] == 1.0
    finally:
        torch.set_num_threads(2)
    fixed, _ = load_engine("random:tiny", EngineConfig(threads=2))
    assert fixed.threads is None and "compute_threads" not in fixed.stats()

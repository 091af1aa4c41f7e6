"""How many threads a CPU step uses, adapted to what else wants the cores.

An OpenMP parallel region ends when its last thread does: when another process (the API process, a
load generator, a neighbour) takes the core of one of the engine's threads, every region that thread is
part of waits for it, and a decode step has hundreds of regions. On a machine with cores to spare the
engine keeps all its threads; while its threads wait for cores (their run delay, which Linux's schedstat
counts per thread) it gives one up, so that the other work has a core and the rest of the team is not
held up by it; it takes the thread back once that core has stayed idle (RELIABILITY.md section 4, "The split
as the default": what each setting does under a load test's overload).

The policy (`ThreadGovernor`) is pure and sees only cumulative counters (`CpuSample`); `ProcCounters`
reads them from /proc on Linux. Where they cannot be read the thread count stays fixed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuSample:
    """Cumulative counters at one moment: seconds of wall clock, of idle cores on the machine, and of time
    this process's threads were runnable but waiting for a core."""

    wall_s: float
    idle_s: float
    delay_s: float


@dataclass(frozen=True)
class GovernorPolicy:
    interval_s: float = 0.5  # how often the counters are read and a decision is taken
    # Give up a thread when this process's threads together waited for cores more than this share of the
    # interval: a team whose members wait that long loses more than the thread brings (on the AVX-512 kind,
    # SmolLM2 at batch ~60: 2 threads do ~1.5x one alone, and a calm server's threads wait 0.03-0.2 with
    # 60 clients streaming; a load test's overload makes them wait 0.7).
    drop_delay: float = 0.3
    # Take a thread back when at least this much of a core stayed idle over `raise_after` intervals in a
    # row: under an overload the others' demand comes in bursts, and a thread taken back in a lull holds
    # their next burst up for an interval.
    raise_idle: float = 0.75
    raise_after: int = 4
    # After a thread was taken back and had to be given up again within `hold_s`, wait `hold_s` before the
    # next try, doubled on each failed try up to `max_hold_s`: a steady load is not probed every second.
    hold_s: float = 2.0
    max_hold_s: float = 30.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.hold_s <= 0 or self.max_hold_s < self.hold_s:
            raise ValueError("GovernorPolicy needs interval_s > 0 and 0 < hold_s <= max_hold_s")
        if not self.drop_delay > 0 or not self.raise_idle > 0 or self.raise_after < 1:
            raise ValueError("GovernorPolicy.drop_delay and raise_idle must be > 0, raise_after >= 1")


class ThreadGovernor:
    """Decides the thread count from successive samples: `observe` returns the new count when it changes."""

    def __init__(self, max_threads: int, policy: GovernorPolicy | None = None) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be >= 1")
        self.max_threads = self.threads = max_threads
        self.policy = policy or GovernorPolicy()
        self._last: CpuSample | None = None
        self._raised_at: float | None = None  # when the last thread was taken back
        self._hold = self.policy.hold_s
        self._next_raise = 0.0
        self._idle_run = 0  # intervals in a row with a core idle

    def observe(self, now: CpuSample) -> int | None:
        last, self._last = self._last, now
        if last is None or now.wall_s - last.wall_s <= 0:
            return None
        p, wall = self.policy, now.wall_s - last.wall_s
        delay, idle = (now.delay_s - last.delay_s) / wall, (now.idle_s - last.idle_s) / wall
        self._idle_run = self._idle_run + 1 if idle >= p.raise_idle else 0
        if self.threads > 1 and delay > p.drop_delay:
            if self._raised_at is not None and now.wall_s - self._raised_at < p.hold_s:
                self._hold = min(2 * self._hold, p.max_hold_s)  # the core taken back was not free
            else:
                self._hold = p.hold_s
            self._raised_at = None
            self._next_raise = now.wall_s + self._hold
            self.threads -= 1
            return self.threads
        may_raise = self._idle_run >= p.raise_after and now.wall_s >= self._next_raise
        if self.threads < self.max_threads and may_raise:
            self._raised_at = now.wall_s
            self._idle_run = 0
            self.threads += 1
            return self.threads
        return None


class ProcCounters:
    """`CpuSample`s of this process from Linux's /proc: idle from /proc/stat, run delay from each thread's
    schedstat."""

    def __init__(self, proc: Path = _PROC) -> None:
        self._proc = proc
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self) -> CpuSample | None:
        try:
            fields = (self._proc / "stat").read_text().split("\n", 1)[0].split()
            idle = (int(fields[4]) + int(fields[5])) / self._tick  # idle + iowait, all cores
            delay = 0
            for task in (self._proc / "self" / "task").iterdir():
                try:
                    delay += int((task / "schedstat").read_text().split()[1])
                except FileNotFoundError:  # the thread ended meanwhile
                    continue
        except (OSError, IndexError, ValueError):
            return None
        return CpuSample(time.monotonic(), idle, delay / 1e9)


class AdaptiveThreads:
    """Ticked before each step on the stepping thread: reads the counters every policy interval and applies
    the governor's count through `set_threads` (torch.set_num_threads: the C kernels read it per call)."""

    def __init__(self, max_threads: int, set_threads: Callable[[int], None],
                 counters: Callable[[], CpuSample | None] | None = None,
                 policy: GovernorPolicy | None = None) -> None:
        self.governor = ThreadGovernor(max_threads, policy)
        self._set = set_threads
        self._counters = counters or ProcCounters().sample
        first = self._counters()
        self.enabled = first is not None
        self._due = time.monotonic() + self.governor.policy.interval_s
        if first is not None:
            self.governor.observe(first)  # the baseline

    def tick(self) -> None:
        if not self.enabled or time.monotonic() < self._due:
            return
        self._due = time.monotonic() + self.governor.policy.interval_s
        sample = self._counters()
        if sample is None:  # back to the configured count, and so reported (the engine's stats read it)
            self.enabled = False
            self.governor.threads = self.governor.max_threads
            self._set(self.governor.max_threads)
            return
        before = self.governor.threads
        threads = self.governor.observe(sample)
        if threads is not None:
            log.info("compute threads %d -> %d", before, threads)
            self._set(threads)

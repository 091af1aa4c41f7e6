"""The per-account sliding-window limiter (3036), on a clock the test moves."""

from __future__ import annotations

import pytest

from loraserve.api.ratelimit import RateLimiter
from loraserve.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window() -> None:
    clock = Clock()
    limiter = RateLimiter(3, window_s=60, clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimited) as limited:
        limiter.check("a")
    assert (limited.value.code, limited.value.status) == (3036, 429)
    limiter.check("b")  # per account
    clock.now += 59.9
    with pytest.raises(RateLimited):
        limiter.check("a")
    clock.now += 0.2  # the first three calls leave the window together
    for _ in range(3):
        limiter.check("a")


def test_no_burst_across_a_window_edge() -> None:
    clock = Clock()
    limiter = RateLimiter(2, window_s=60, clock=clock)
    limiter.check("a")
    clock.now += 50
    limiter.check("a")
    clock.now += 15  # a fixed window would have reset here
    limiter.check("a")
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_zero_disables_and_negative_is_refused() -> None:
    limiter = RateLimiter(0)
    assert not limiter.enabled
    for _ in range(1000):
        limiter.check("a")
    with pytest.raises(ValueError):
        RateLimiter(-1)
    with pytest.raises(ValueError):
        RateLimiter(1, window_s=0)


def test_idle_accounts_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(1, window_s=1, clock=clock)
    for i in range(10_001):
        limiter.check(f"acct-{i}")
    clock.now += 2
    limiter.check("late")
    assert len(limiter._calls) < 100

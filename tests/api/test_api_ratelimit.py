"""The in-memory per-account sliding-window limiter (3036), on a clock the test moves
(the Redis one: test_api_ratelimit_redis.py)."""

from __future__ import annotations

import pytest

from loraserve.api.ratelimit import MemoryRateLimiter
from loraserve.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_sliding_window() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(3, window_s=60, clock=clock)
    for _ in range(3):
        await limiter.check("a")
    with pytest.raises(RateLimited) as limited:
        await limiter.check("a")
    assert (limited.value.code, limited.value.status) == (3036, 429)
    await limiter.check("b")  # per account
    clock.now += 59.9
    with pytest.raises(RateLimited):
        await limiter.check("a")
    clock.now += 0.2  # the first three calls leave the window together
    for _ in range(3):
        await limiter.check("a")


async def test_no_burst_across_a_window_edge() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(2, window_s=60, clock=clock)
    await limiter.check("a")
    clock.now += 50
    await limiter.check("a")
    clock.now += 15  # a fixed window would have reset here
    await limiter.check("a")
    with pytest.raises(RateLimited):
        await limiter.check("a")


async def test_zero_disables_and_negative_is_refused() -> None:
    limiter = MemoryRateLimiter(0)
    assert not limiter.enabled
    for _ in range(1000):
        await limiter.check("a")
    with pytest.raises(ValueError):
        MemoryRateLimiter(-1)
    with pytest.raises(ValueError):
        MemoryRateLimiter(1, window_s=0)


async def test_idle_accounts_are_forgotten() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(1, window_s=1, clock=clock)
    for i in range(10_001):
        await limiter.check(f"acct-{i}")
    clock.now += 2
    await limiter.check("late")
    assert len(limiter._calls) < 100

"""Per-account request rate limit (contract section 5: 300 text generations a minute, on by default).

One interface, two implementations picked once by `rate_limiter_for`: a log in this process's memory, or
one in Redis (ratelimit_redis.py) that every gateway process in front of the same engines shares.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from loraserve.api.settings import ServerSettings
from loraserve.errors import RateLimited

WINDOW_S = 60.0  # the limit is per minute (ServerSettings.rate_limit_per_minute)


class RateLimiter(ABC):
    """At most `limit` calls per account in any `window_s` seconds: a sliding window, not a fixed one,
    because a fixed window lets a client burst twice the limit across a window edge."""

    @abstractmethod
    async def check(self, key: str) -> None:
        """Count one call for `key`; raises RateLimited (3036) when the window is already full."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what the limiter holds (connections); call it on the loop that used it."""


class MemoryRateLimiter(RateLimiter):
    """A sliding-window log in this process: exact, and free of I/O (`check` never suspends).

    Memory is bounded by `limit` timestamps per active account; idle accounts are forgotten.
    """

    def __init__(
        self, limit: int, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0 (0 disables the limit)")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        # `check` runs on the event loop only and never suspends: no lock needed.
        self._calls: dict[str, deque[float]] = {}

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    async def check(self, key: str) -> None:
        if not self.enabled:
            return
        now = self._clock()
        calls = self._calls.setdefault(key, deque())
        while calls and calls[0] <= now - self.window_s:
            calls.popleft()
        if len(calls) >= self.limit:
            raise RateLimited()
        calls.append(now)
        if len(self._calls) > 10_000:
            self._forget_idle(now)

    async def aclose(self) -> None:
        pass  # nothing held but memory

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, calls in self._calls.items() if not calls or calls[-1] <= now - self.window_s]
        for key in idle:
            del self._calls[key]


def rate_limiter_for(settings: ServerSettings) -> RateLimiter:
    """The limiter the settings ask for: Redis's when `redis_url` is set (and the limit is on)."""
    if settings.redis_url is None or settings.rate_limit_per_minute == 0:
        return MemoryRateLimiter(settings.rate_limit_per_minute)
    # Imported only here: the `redis` package is an optional extra (`loraserve[cluster]`).
    from loraserve.api.ratelimit_redis import RedisRateLimiter

    return RedisRateLimiter(settings.redis_url, settings.rate_limit_per_minute)

"""Per-account request rate limit (contract section 5: 300 text generations a minute, on by default)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from loraserve.errors import RateLimited


class RateLimiter:
    """A sliding-window log: at most `limit` calls per account in any `window_s` seconds.

    A log rather than a fixed window because a fixed window lets a client burst twice the limit
    across a window edge; memory is bounded by `limit` timestamps per active account.
    """

    def __init__(
        self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0 (0 disables the limit)")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._calls: dict[str, deque[float]] = {}
        # Checked from the event loop and from worker threads alike.
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def check(self, key: str) -> None:
        """Count one call for `key`; raises RateLimited (3036) when the window is already full."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            calls = self._calls.setdefault(key, deque())
            while calls and calls[0] <= now - self.window_s:
                calls.popleft()
            if len(calls) >= self.limit:
                raise RateLimited()
            calls.append(now)
            if len(self._calls) > 10_000:
                self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, calls in self._calls.items() if not calls or calls[-1] <= now - self.window_s]
        for key in idle:
            del self._calls[key]

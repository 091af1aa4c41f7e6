"""Tokens that passed authentication a moment ago, so that a busy account costs the database one query a
second instead of two per request (and the event loop no hop to a worker thread).

Only successes are kept, for at most `ttl_s`: a token revoked through this registry is forgotten at once,
one revoked by another process (the `loraserve token revoke` command, another gateway on the same
database) stops working within `ttl_s`. Tokens are kept as their SHA-256, never in clear.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

# How long a revocation by another process may take to be honoured.
TOKEN_CACHE_TTL_S = 1.0
_MAX_ENTRIES = 10_000


class TokenCache:
    def __init__(self, ttl_s: float = TOKEN_CACHE_TTL_S, max_entries: int = _MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s >= 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.ttl_s, self.max_entries, self._clock = ttl_s, max_entries, clock
        self._until: dict[tuple[str, bytes], float] = {}
        self._lock = threading.Lock()  # read on the event loop, filled from worker threads

    @staticmethod
    def _key(account_id: str, token: str) -> tuple[str, bytes]:
        return account_id, hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def hit(self, account_id: str, token: str) -> bool:
        """True when `token` authenticated for `account_id` less than ttl_s ago."""
        key = self._key(account_id, token)
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return False
            if until <= self._clock():
                del self._until[key]
                return False
            return True

    def put(self, account_id: str, token: str) -> None:
        if self.ttl_s == 0:
            return
        now = self._clock()
        with self._lock:
            if len(self._until) >= self.max_entries:
                self._until = {k: t for k, t in self._until.items() if t > now}
                if len(self._until) >= self.max_entries:  # all live: start over rather than grow
                    self._until.clear()
            self._until[self._key(account_id, token)] = now + self.ttl_s

    def clear(self) -> None:
        with self._lock:
            self._until.clear()

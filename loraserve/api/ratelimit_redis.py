"""The rate limit in Redis: one sliding-window log per account, shared by every gateway process.

Fails closed: while Redis is unreachable, times out or refuses the write, each call is refused with
429 / 3040 naming Redis (retryable), never let through uncounted, since gateways that silently stopped
limiting would hand one account every engine's capacity, and never a 500. The client reconnects on the
next call by itself, so calls are served again as soon as Redis answers; the two transitions are logged
once each, not once per request.
"""

from __future__ import annotations

import itertools
import logging
import os
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from loraserve.api.ratelimit import WINDOW_S, RateLimiter
from loraserve.errors import CapacityExceeded, RateLimited

log = logging.getLogger(__name__)

# A dead Redis must cost a request a fraction of a second, not the client library's default of many.
TIMEOUT_S = 0.25
KEY_PREFIX = "loraserve:ratelimit:"

# KEYS[1]: the account's log, a sorted set of its calls scored in microseconds of Redis's own clock (TIME),
# so that the gateways' clocks need not agree. ARGV: the limit, the window in microseconds, a member name
# unique to this call. One script, so that trimming, counting and adding are one atomic step across
# gateways. Numbers go to redis.call through '%d' because Lua's own conversion keeps 14 significant digits
# and epoch microseconds have 16.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - window))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[3])
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(window / 1000)))
return 1
"""


class RedisUnavailable(CapacityExceeded):
    """The shared rate-limit store does not answer: the capacity answer (429 / 3040, retry later)."""

    def __init__(self) -> None:
        super().__init__(
            "Capacity temporarily exceeded: the rate-limit store (Redis) is unavailable, please try again."
        )


class RedisRateLimiter(RateLimiter):
    """The same sliding-window log as MemoryRateLimiter, kept in Redis at `url`.

    Each account's log holds at most `limit` entries and expires a window after its last call.
    """

    def __init__(
        self, url: str, limit: int, window_s: float = WINDOW_S, *, key_prefix: str = KEY_PREFIX,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1 (a disabled limit needs no Redis)")
        if window_s < 0.001:
            raise ValueError("window_s must be >= 0.001 (Redis expires keys by the millisecond)")
        # One retry, at once: the first command on a connection that a restarted Redis dropped fails, and
        # the retry reconnects; a Redis that is really gone then costs at most two timeouts.
        self._redis = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 1))
        self._script = self._redis.register_script(_SLIDING_WINDOW)
        self._limit = limit
        self._window_us = round(window_s * 1_000_000)
        self._key_prefix = key_prefix
        # Members must differ between gateways that log a call in the same microsecond.
        self._origin = os.urandom(6).hex()
        self._serial = itertools.count()
        self._where = _without_credentials(url)
        self._unavailable = False

    async def check(self, key: str) -> None:
        member = f"{self._origin}:{next(self._serial)}"
        try:
            allowed = await self._script(keys=[self._key_prefix + key],
                                         args=[self._limit, self._window_us, member])
        except RedisError as exc:
            if not self._unavailable:
                self._unavailable = True
                log.warning("rate limit: Redis at %s is unavailable (%s: %s); text generation is refused "
                            "with 429 / 3040 until it answers", self._where, type(exc).__name__, exc)
            raise RedisUnavailable() from None
        if self._unavailable:
            self._unavailable = False
            log.warning("rate limit: Redis at %s answers again", self._where)
        if not allowed:
            raise RateLimited()

    async def aclose(self) -> None:
        await self._redis.aclose()


def _without_credentials(url: str) -> str:
    """The URL for logs: a password in it stays out of them."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"

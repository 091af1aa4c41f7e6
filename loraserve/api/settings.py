"""The HTTP server's knobs (the registry's and the engine's live with them)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from urllib.parse import urlsplit

# JSON bodies other than /run (finetune create, ...) are a few hundred bytes; this only stops abuse.
_SMALL_JSON_BYTES = 64 * 1024
# A multipart upload carries the file plus boundaries and two small fields.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerSettings:
    # /run bodies: a 131072-char prompt is at most 512 KiB of UTF-8; a long conversation a few times that.
    max_run_body_bytes: int = 4 * 1024 * 1024
    max_json_body_bytes: int = _SMALL_JSON_BYTES
    # Text-generation calls per account per minute (the public service's limit); 0 disables the limit.
    rate_limit_per_minute: int = 300
    # Wall-clock budget of one /run call, queueing included; None means no limit.
    request_timeout_s: float | None = None
    # When set, GET /metrics wants `Authorization: Bearer <metrics_token>` (its series name finetune ids).
    metrics_token: str | None = None
    # When set, the rate limit is counted in this Redis, shared by every gateway process that uses it.
    redis_url: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_run_body_bytes", "max_json_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerSettings.{name} must be an integer >= 1, got {value!r}")
        limit = self.rate_limit_per_minute
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"ServerSettings.rate_limit_per_minute must be an integer >= 0, got {limit!r}")
        timeout = self.request_timeout_s
        if timeout is not None and not timeout > 0:
            raise ValueError(f"ServerSettings.request_timeout_s must be > 0 or None, got {timeout!r}")
        token = self.metrics_token
        if token is not None and (
            not isinstance(token, str) or len(token.strip()) < 16 or token != token.strip()
        ):
            raise ValueError(
                "ServerSettings.metrics_token must be at least 16 characters, without surrounding spaces"
            )
        if self.redis_url is not None:
            _check_redis_url(self.redis_url)


def _check_redis_url(url: object) -> None:
    """The URL forms redis-py takes; checked here so that a typo stops the start, not every request.
    Messages leave the URL out: it may hold a password."""
    name = "ServerSettings.redis_url"
    if not isinstance(url, str):
        raise ValueError(f"{name} must be a string")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{name} must start with redis://, rediss:// or unix://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{name} has a port that is not a number from 0 to 65535") from None
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"{name} names no socket path (unix:///path/to/redis.sock)")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"{name} names no host (redis://HOST:PORT/DB)")
    if port == 0:
        raise ValueError(f"{name} has port 0")
    if importlib.util.find_spec("redis") is None:
        raise ValueError(f"{name} needs the redis package: pip install 'loraserve[cluster]'")

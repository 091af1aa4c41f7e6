"""The HTTP server's knobs (the registry's and the engine's live with them)."""

from __future__ import annotations

from dataclasses import dataclass

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

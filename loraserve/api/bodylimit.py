"""Request size limits, enforced while the body streams in: an oversized upload is cut off at the
limit instead of being buffered (or spooled to disk) first and measured afterwards.

Each path has its limit and the error that refuses it: 3006 for requests, but 3039 naming the file
limit for adapter uploads (an adapter file too large is an invalid finetune file, as a file just over
the limit is when the registry measures it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.api.envelope import error_response
from loraserve.errors import RequestTooLarge, WorkersAIError


@dataclass(frozen=True)
class BodyLimit:
    max_bytes: int
    refusal: Callable[[], WorkersAIError] = RequestTooLarge


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], BodyLimit]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = self.limit_for_path(scope["path"])
        limit = rule.max_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # Refused before reading a byte; the connection is closed as the body is left unread.
            await error_response(rule.refusal(), headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the endpoint's body read, so the app's handlers answer with it.
                    raise rule.refusal()
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

"""OpenAI's error shape on the /v1 routes: `{"error": {"message", "type", "param", "code"}}`.

Every layer below raises or answers with the Workers AI envelope; `OpenAIErrorMiddleware` reshapes it
on the way out, so auth, body limits, 404s and the routes' own errors all look like OpenAI's.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.errors import WorkersAIError

# Workers AI codes with a well-known OpenAI counterpart; the others keep their number (as a string).
_OPENAI_CODES = {
    10000: "invalid_api_key",
    5007: "model_not_found",
    5021: "context_length_exceeded",
    3036: "rate_limit_exceeded",
}


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status == 408:
        return "timeout_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _error_type(status), "param": None,
                      "code": _OPENAI_CODES.get(code, str(code))}}


def openai_error(error: WorkersAIError) -> dict[str, Any]:
    return openai_error_body(error.status, error.code, error.message)


def is_openai_path(path: str) -> bool:
    return path.startswith("/client/v4/accounts/") and "/ai/v1/" in path


class OpenAIErrorMiddleware:
    """On the /v1 routes, every error envelope (whoever made it: routes, auth, body limits, 404s)
    goes out as OpenAI's `{"error": {"message", "type", "param", "code"}}`, with the same status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_openai_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def reshaping_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and int(message["status"]) >= 400:
                start = message  # held until the whole (small, JSON) error body is here
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = int(start["status"])
            payload = _reshape(status, bytes(body))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": payload, "more_body": False})

        await self.app(scope, receive, reshaping_send)


def _reshape(status: int, body: bytes) -> bytes:
    try:
        data = json.loads(body)
        first = data["errors"][0]
        reshaped = openai_error_body(status, int(first["code"]), str(first["message"]))
    except (ValueError, KeyError, IndexError, TypeError):
        reshaped = openai_error_body(status, 0, body.decode("utf-8", "replace")[:500] or "error")
    return json.dumps(reshaped).encode()

"""Server-sent events exactly as Workers AI sends them (contract section 1), and the response that
streams them while watching for the client to go away."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraserve.api.usage import Usage
from loraserve.errors import WorkersAIError

PADDING_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
DONE = b"data: [DONE]\n\n"


def padding() -> str:
    """A prefix of random length, so that an encrypted event's size does not reveal its token."""
    return PADDING_ALPHABET[: 1 + secrets.randbelow(len(PADDING_ALPHABET))]


def _event(payload: dict[str, Any]) -> bytes:
    # Compact like the public service; raw UTF-8 rather than \u escapes (the text is whole characters).
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def text_event(text: str) -> bytes:
    return _event({"response": text, "p": padding()})


def usage_event(usage: Usage) -> bytes:
    return _event({"response": "", "usage": usage})


def error_event(error: WorkersAIError) -> bytes:
    """A failure after the 200 went out: the envelope as an event, then the stream ends (no DONE)."""
    return _event(error.envelope())


class EventStreamResponse(StreamingResponse):
    """Streams `chunks` and calls `on_close` however it ends.

    Unlike StreamingResponse under ASGI 2.4 it always listens for the client's disconnect, because
    a generation that nobody reads must stop at once, not at the next token a send would fail on.
    """

    def __init__(
        self, chunks: AsyncIterator[bytes], on_close: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            chunks,
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})},
        )
        self.chunks = chunks
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async with anyio.create_task_group() as tg:

                async def pump() -> None:
                    try:
                        async for chunk in self.chunks:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:
                        pass  # the client went away mid-send
                    finally:
                        tg.cancel_scope.cancel()

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(pump)
                tg.start_soon(watch)
        finally:
            self.on_close()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

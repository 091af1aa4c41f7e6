"""What the OpenAI-compatible routes send: stop-sequence cutting, the chat.completion(.chunk) and
text_completion objects, and their SSE framing. No I/O: routes.py drives them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from loraserve.api.openai.logprobs import CompletionLogprobs, chat_logprobs
from loraserve.api.usage import Usage
from loraserve.types import FinishReason, PositionLogprobs

# -- stop sequences ---------------------------------------------------------------------------------


class StopMatcher:
    """Cuts the output at the first stop sequence. Text that could be the start of one is held back
    until the next delta tells, so a streamed answer never shows part of a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that is now safe to emit. Sets `stopped` when a stop sequence was found."""
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = self._partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest end of `pending` that some stop sequence starts with."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if stop.startswith(self.pending[-k:]):
                    longest = k
                    break
        return longest


def openai_finish_reason(reason: FinishReason | None) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


# -- response shapes --------------------------------------------------------------------------------


class ResponseShape:
    """Builds one endpoint's objects: chat.completion(.chunk) or text_completion. With `logprobs`, each
    choice carries the logprobs of the positions given with it (`text_offset` counted from `offset`, the
    characters that precede the first of them); without, `"logprobs": null`."""

    def __init__(self, chat: bool, request_id: str, model: str, logprobs: bool = False,
                 offset: int = 0) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.logprobs = logprobs
        self._completion_logprobs = CompletionLogprobs(offset)

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _logprobs(self, positions: Sequence[PositionLogprobs] | None) -> dict[str, Any] | None:
        if not self.logprobs or positions is None:
            return None
        return chat_logprobs(positions) if self.chat else self._completion_logprobs.add(positions)

    def completion(self, text: str, finish: str, used: Usage,
                   positions: Sequence[PositionLogprobs] = ()) -> dict[str, Any]:
        logprobs = self._logprobs(positions)
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": logprobs, "finish_reason": finish}
            return {**self._base("chat.completion"), "choices": [choice], "usage": used}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice], "usage": used}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False,
              positions: Sequence[PositionLogprobs] | None = None) -> dict[str, Any]:
        logprobs = self._logprobs(positions)
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, used: Usage) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": used}


def sse_bytes(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"

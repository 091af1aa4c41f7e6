"""`choices[0].logprobs` as OpenAI shapes it, from the engine's per-token log-probabilities: the legacy
completions object (parallel lists) and chat's `content` list. No I/O: shapes.py calls these."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

from loraserve.types import PositionLogprobs

# JSON has no infinities; OpenAI and vLLM send this for a token the model rules out.
_FLOOR = -9999.0


def token_text(token: bytes) -> str:
    """A token as text; one that holds part of a UTF-8 character is spelled as OpenAI does,
    "bytes:\\xe2\\x80"."""
    try:
        return token.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token)


def _value(logprob: float) -> float:
    return max(logprob, _FLOOR)


class CompletionLogprobs:
    """The legacy completions' `logprobs` of one response, built chunk by chunk: `{"tokens",
    "token_logprobs", "top_logprobs", "text_offset"}`. `text_offset` counts the characters of the
    returned text before each token (a token that ends part-way through a character is followed by one
    at the same offset); `top_logprobs` holds the most likely tokens and the chosen one."""

    def __init__(self, offset: int = 0) -> None:
        self._offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, positions: Sequence[PositionLogprobs]) -> dict[str, list[Any]]:
        """The object for these positions (the next ones of the text)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for p in positions:
            text = token_text(p.token)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(p.token))
            if p.logprob is None:  # the prompt's first token: nothing predicts it
                values.append(None)
                tops.append(None)
                continue
            values.append(_value(p.logprob))
            top = {token_text(t.token): _value(t.logprob) for t in p.top}
            top.setdefault(text, _value(p.logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _chat_token(token: bytes, logprob: float) -> dict[str, Any]:
    return {"token": token_text(token), "logprob": _value(logprob), "bytes": list(token)}


def chat_logprobs(positions: Sequence[PositionLogprobs]) -> dict[str, Any]:
    """Chat's `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}` (generated
    tokens only: each has a logprob)."""
    return {"content": [{**_chat_token(p.token, p.logprob if p.logprob is not None else _FLOOR),
                         "top_logprobs": [_chat_token(t.token, t.logprob) for t in p.top]}
                        for p in positions]}

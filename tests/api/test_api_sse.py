"""The event encoding of loraserve.api.sse, byte for byte."""

from __future__ import annotations

import json

from loraserve.api.sse import DONE, PADDING_ALPHABET, error_event, padding, text_event, usage_event
from loraserve.api.usage import usage
from loraserve.errors import RequestTimeout


def test_padding_is_a_random_length_prefix_of_the_alphabet() -> None:
    pads = [padding() for _ in range(500)]
    assert all(p and PADDING_ALPHABET.startswith(p) for p in pads)
    assert len({len(p) for p in pads}) > 20


def test_events() -> None:
    event = text_event("你好 🎉")
    assert event.startswith('data: {"response":"你好 🎉","p":"'.encode()) and event.endswith(b'"}\n\n')
    assert usage_event(usage(1, 2, 0)) == (
        b'data: {"response":"","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
    )
    assert DONE == b"data: [DONE]\n\n"
    error = json.loads(error_event(RequestTimeout())[len(b"data: "):])
    assert error == {"result": None, "success": False,
                     "errors": [{"code": 3007, "message": "Request timeout"}], "messages": []}

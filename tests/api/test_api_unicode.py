"""Multi-byte text through the API with a real chat model (the embedded SmolLM2): emoji and CJK
arrive as whole characters in every event, and the stream adds up to the whole answer."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import httpx
import pytest

from conftest import EMBEDDED_MODEL, LiveServer


def run(server: LiveServer, body: dict[str, Any]) -> tuple[str, list[str]]:
    account = server.new_account()
    url = server.run_url(account, EMBEDDED_MODEL)
    whole = httpx.post(url, headers=account.headers, json=body, timeout=60)
    assert whole.status_code == 200, whole.text
    with httpx.stream(
        "POST", url, headers=account.headers, json={**body, "stream": True}, timeout=60
    ) as response:
        raw = response.read()
    texts = []
    for event in raw[:-2].split(b"\n\n")[:-2]:  # text events, before usage and [DONE]
        assert event.startswith(b"data: ")
        # Each event alone is valid UTF-8 JSON: no character is split across two events.
        texts.append(json.loads(event[len(b"data: "):].decode("utf-8", errors="strict"))["response"])
    text: str = whole.json()["result"]["response"]
    return text, texts


@pytest.mark.parametrize(
    ("prompt", "script"),
    [("Repeat exactly: 🎉 你好 🎉", "🎉"),
     ("How do you say 'thank you' in Japanese? Answer in Japanese characters.", "HIRAGANA")],
)
def test_multibyte_characters_are_never_split(embedded_server: LiveServer, prompt: str, script: str) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    text, events = run(embedded_server, body)
    assert "".join(events) == text
    # max_tokens may cut the answer inside its last character, which the end of the generation flushes as
    # one U+FFFD (detokenizer.py); anywhere else one would be a character split between tokens.
    assert "\ufffd" not in text.removesuffix("\ufffd")
    if script == "🎉":
        assert "🎉" in text
    else:
        assert any(script in unicodedata.name(ch, "") for ch in text)
    assert all(e and "\ufffd" not in e for e in events[:-1])

"""Log-probabilities on the OpenAI face, their shapes: bad values are OpenAI's 400, /run has none, the
published document describes the fields and the answers, and the objects built from the engine's
per-token values (text offsets, partial UTF-8 characters, -inf)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from loraserve.api.openai.logprobs import CompletionLogprobs, chat_logprobs, token_text
from loraserve.api.openai.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    TextCompletion,
    TextCompletionChunk,
)
from loraserve.types import PositionLogprobs, TokenLogprob

from conftest import LORA_MODEL, Account, LiveServer

PROMPT = "The quick brown fox jumps over the lazy dog."
MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]


@pytest.fixture
def client(server: LiveServer, account: Account) -> Iterator[OpenAI]:
    with OpenAI(api_key=account.token, base_url=f"{server.ai_url(account)}/v1", max_retries=0) as c:
        yield c


@pytest.mark.parametrize(("path", "body", "field"), [
    ("completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": PROMPT, "logprobs": -1}, "logprobs"),
    ("completions", {"prompt": PROMPT, "logprobs": True}, "logprobs"),
    ("completions", {"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "echo": "yes"}, "echo"),
    ("chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": MESSAGES, "logprobs": 1}, "logprobs"),
    ("chat/completions", {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
])
def test_bad_values_are_openais_400(server: LiveServer, account: Account, path: str, body: dict[str, Any],
                                   field: str) -> None:
    response = httpx.post(f"{server.ai_url(account)}/v1/{path}", headers=account.headers,
                          json={"model": LORA_MODEL, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and field in error["message"]


def test_bad_values_through_the_sdk(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=LORA_MODEL, prompt=PROMPT, logprobs=6)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, logprobs=True, top_logprobs=21)


def test_run_has_no_logprobs(server: LiveServer, account: Account) -> None:
    """/run's contract (Workers AI's) has no logprobs: like any field it does not know, it is ignored."""
    response = httpx.post(server.run_url(account), headers=account.headers, timeout=60,
                          json={"prompt": PROMPT, "raw": True, "max_tokens": 2, "logprobs": 6, "echo": True})
    assert response.status_code == 200, response.text
    assert set(response.json()["result"]) == {"response", "usage"}


def test_the_published_schemas_describe_the_fields(server: LiveServer, account: Account) -> None:
    doc = httpx.get(f"{server.base_url}/openapi.json").json()

    def request(path: str) -> dict[str, Any]:
        body = doc["paths"][f"/client/v4/accounts/{{account_id}}/ai/v1/{path}"]["post"]["requestBody"]
        schema: dict[str, Any] = body["content"]["application/json"]["schema"]
        return schema["properties"] if "properties" in schema else _resolve(doc, schema)["properties"]

    completions, chat = request("completions"), request("chat/completions")
    assert _integer_range(completions["logprobs"]) == (0, 5)
    assert _integer_range(completions["max_tokens"]) == (0, None)
    assert {"type": "boolean"} in completions["echo"]["anyOf"]
    assert _integer_range(chat["top_logprobs"]) == (0, 20)
    assert _integer_range(chat["max_tokens"]) == (1, None)
    assert "top_logprobs" not in completions
    # /run's schema is Workers AI's: no logprobs.
    run = httpx.get(f"{server.ai_url(account)}/models/schema", params={"model": LORA_MODEL},
                    headers=account.headers).json()["result"]["input"]
    assert "logprobs" not in str(run) and "echo" not in str(run)


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema["$ref"].removeprefix("#/")
    node: Any = doc
    for part in ref.split("/"):
        node = node[part]
    resolved: dict[str, Any] = node
    return resolved


def _integer_range(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    [integer] = [s for s in schema.get("anyOf", [schema]) if s.get("type") == "integer"]
    return integer.get("minimum"), integer.get("maximum")


def test_completion_logprobs_offsets_and_partial_characters() -> None:
    """`text_offset` counts characters of the text; a token holding part of a character is spelled
    "bytes:" and its bytes, and the next token starts at that character; JSON gets -9999 for -inf."""
    smile = "😀".encode()
    positions = [PositionLogprobs(1, b"Hi", None), PositionLogprobs(2, b" \xc3", -0.5),
                 PositionLogprobs(3, b"\xa9!", -1.0, (TokenLogprob(3, b"\xa9!", -1.0),
                                                     TokenLogprob(4, b"x", float("-inf")))),
                 PositionLogprobs(5, smile[:2], -2.0), PositionLogprobs(6, smile[2:], -3.0),
                 PositionLogprobs(7, b" ok", -0.25)]
    whole = CompletionLogprobs().add(positions)
    assert whole == {
        "tokens": ["Hi", "bytes:\\x20\\xc3", "bytes:\\xa9\\x21", "bytes:\\xf0\\x9f", "bytes:\\x98\\x80",
                   " ok"],
        "token_logprobs": [None, -0.5, -1.0, -2.0, -3.0, -0.25],
        "top_logprobs": [None, {"bytes:\\x20\\xc3": -0.5}, {"bytes:\\xa9\\x21": -1.0, "x": -9999.0},
                         {"bytes:\\xf0\\x9f": -2.0}, {"bytes:\\x98\\x80": -3.0}, {" ok": -0.25}],
        "text_offset": [0, 2, 3, 5, 5, 6],  # "Hi é!😀 ok"
    }
    # Chunk by chunk, the offsets continue.
    chunked = CompletionLogprobs()
    parts = [chunked.add(positions[:3]), chunked.add(positions[3:4]), chunked.add(positions[4:])]
    assert [o for p in parts for o in p["text_offset"]] == whole["text_offset"]
    assert token_text(b"caf\xc3\xa9") == "café"
    chat = chat_logprobs(positions[2:3])["content"]
    assert chat == [{"token": "bytes:\\xa9\\x21", "logprob": -1.0, "bytes": [0xa9, 0x21], "top_logprobs": [
        {"token": "bytes:\\xa9\\x21", "logprob": -1.0, "bytes": [0xa9, 0x21]},
        {"token": "x", "logprob": -9999.0, "bytes": [0x78]}]}]


def test_answers_are_what_the_document_says(server: LiveServer, account: Account) -> None:
    """The answers with logprobs validate against the response models /openapi.json publishes."""
    base = f"{server.ai_url(account)}/v1"
    completions = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 2}
    chat = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "max_tokens": 2}
    cases: list[tuple[str, dict[str, Any], Any, Any]] = [
        ("completions", completions, TextCompletion, TextCompletionChunk),
        ("chat/completions", chat, ChatCompletion, ChatCompletionChunk)]
    for path, body, whole, chunk in cases:
        response = httpx.post(f"{base}/{path}", headers=account.headers, json={"model": LORA_MODEL, **body},
                              timeout=60)
        assert whole.model_validate(response.json()).choices[0].logprobs is not None
        with httpx.stream("POST", f"{base}/{path}", headers=account.headers, timeout=60,
                          json={"model": LORA_MODEL, "stream": True, **body}) as streamed:
            events = [line.removeprefix("data: ") for line in streamed.iter_lines() if line]
        assert events[-1] == "[DONE]"
        chunks = [chunk.model_validate_json(e) for e in events[:-1]]
        assert any(c.choices[0].logprobs is not None for c in chunks)

"""Prompt caching over real HTTP: `usage.prompt_tokens_details.cached_tokens` on /run (whole and streamed)
and on the OpenAI routes (read by the official SDK), and the `x-session-affinity` header, accepted
everywhere a generation is asked for and refused (5006) when it is no sane key."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import LORA_MODEL, Account, LiveServer

# Raw, so the tokens are exactly these: several full KV blocks of them.
PROMPT = "[INST] " + "The quick brown fox jumps over the lazy dog. " * 4 + "[/INST]"
BODY = {"prompt": PROMPT, "raw": True, "max_tokens": 3, "temperature": 0}
SYSTEM = "You answer in one word. " * 6
MESSAGES: list[Any] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
SESSION = {"x-session-affinity": "conversation-7f3a"}


def shared_blocks(backend: Any, prompt_tokens: int) -> int:
    """The prompt tokens an identical request finds cached: its full blocks, but for the one holding its
    last token, whose logits are computed again."""
    block_size: int = backend.engine.ecfg.block_size
    return (prompt_tokens - 1) // block_size * block_size


def cached(usage: dict[str, Any]) -> int:
    value: int = usage["prompt_tokens_details"]["cached_tokens"]
    return value


def run(server: LiveServer, account: Account, body: dict[str, Any],
        headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.run_url(account), headers={**account.headers, **(headers or {})}, json=body,
                      timeout=60)


def run_usage(server: LiveServer, account: Account, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = run(server, account, BODY, headers)
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["result"]["usage"]
    return usage


def streamed_usage(server: LiveServer, account: Account, headers: dict[str, str]) -> dict[str, Any]:
    with httpx.stream("POST", server.run_url(account), headers={**account.headers, **headers}, timeout=60,
                      json={**BODY, "stream": True}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert set(last) == {"response", "usage"} and last["response"] == ""
    usage: dict[str, Any] = last["usage"]
    return usage


def test_run_reports_the_prompt_tokens_served_from_the_cache(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    first = run_usage(server, account)
    n = first["prompt_tokens"]
    hit = shared_blocks(tiny_backend, n)
    assert hit > 0
    assert first == {"prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3,
                     "prompt_tokens_details": {"cached_tokens": 0}}
    again = {**first, "prompt_tokens_details": {"cached_tokens": hit}}
    assert run_usage(server, account, SESSION) == again
    assert streamed_usage(server, account, SESSION) == again
    # Another account's requests never find this one's prompts (the cache is scoped by account).
    assert cached(run_usage(server, server.new_account())) == 0


def test_openai_routes_report_cached_tokens_as_openai_does(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    with OpenAI(api_key=account.token, base_url=f"{server.ai_url(account)}/v1", max_retries=0) as client:
        def chat(**extra: Any) -> Any:
            return client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=2,
                                                  temperature=0, extra_headers=SESSION, **extra)

        first, second = chat(), chat()
        chunks = list(chat(stream=True, stream_options={"include_usage": True}))
        completions = [client.completions.create(model=LORA_MODEL, prompt=PROMPT, max_tokens=2).usage
                       for _ in range(2)]
    hit = shared_blocks(tiny_backend, first.usage.prompt_tokens)
    assert hit > 0
    assert [first.usage.prompt_tokens_details.cached_tokens, second.usage.prompt_tokens_details.cached_tokens,
            chunks[-1].usage.prompt_tokens_details.cached_tokens] == [0, hit, hit]
    [one, two] = [(u.prompt_tokens, u.prompt_tokens_details.cached_tokens)
                  for u in completions if u is not None and u.prompt_tokens_details is not None]
    assert one == (two[0], 0) and two == (one[0], shared_blocks(tiny_backend, one[0]))


def test_the_session_header_is_optional_and_opaque(server: LiveServer, account: Account) -> None:
    for value in ("", "a", "user:42/conversation 7 ~ {x}", "k" * 256):
        assert run(server, account, BODY, {"x-session-affinity": value}).status_code == 200, value


@pytest.mark.parametrize(("value", "why"), [
    (b"k" * 257, "at most 256 characters"),
    ("café".encode(), "only printable ASCII characters are allowed"),  # UTF-8 bytes
    (b"tab\there", "only printable ASCII characters are allowed"),
])
def test_a_bad_session_header_is_bad_input(
    server: LiveServer, account: Account, value: bytes, why: str
) -> None:
    header = {b"x-session-affinity": value}
    headers = {b"authorization": account.headers["Authorization"].encode(), **header}
    response = httpx.post(server.run_url(account), headers=headers, json=BODY)
    assert response.status_code == 400, response.text
    [error] = response.json()["errors"]
    assert error["code"] == 5006 and error["message"] == f"AiError: Bad input: x-session-affinity: {why}"
    chat = httpx.post(f"{server.ai_url(account)}/v1/chat/completions", headers=headers,
                      json={"model": LORA_MODEL, "messages": MESSAGES})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "5006"
    assert "x-session-affinity" in chat.json()["error"]["message"]
    # The token is checked first: a stranger learns nothing from the header's fate.
    assert httpx.post(server.run_url(account), headers=header, json=BODY).status_code == 401


def test_a_session_header_sent_twice_is_bad_input(server: LiveServer, account: Account) -> None:
    headers = [*account.headers.items(), ("x-session-affinity", "a"), ("x-session-affinity", "b")]
    response = httpx.post(server.run_url(account), headers=headers, json=BODY)
    assert response.status_code == 400 and response.json()["errors"][0]["code"] == 5006
    assert "sent more than once" in response.json()["errors"][0]["message"]


def test_the_document_lists_the_header_where_it_is_read(server: LiveServer) -> None:
    paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    prefix = "/client/v4/accounts/{account_id}/ai"
    for path in ("/run/{model}", "/v1/chat/completions", "/v1/completions", "/finetunes"):
        names = [p["name"] for p in paths[prefix + path]["post"].get("parameters", [])]
        assert ("x-session-affinity" in names) is (path != "/finetunes"), path

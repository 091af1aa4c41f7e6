"""The OpenAI-compatible face (/ai/v1), driven by the official `openai` SDK against a live server:
chat and completions, streamed and not, with and without a real finetune, parameters, stop
sequences and errors in OpenAI's shape."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from loraserve.api.openai.shapes import StopMatcher

from conftest import BASE_NAME, LORA_MODEL, NO_LORA_MODEL, Account, LiveServer, create_finetune

MESSAGES: list[Any] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello"}]


@pytest.fixture
def client(server: LiveServer, account: Account) -> Iterator[OpenAI]:
    # No retries: a retried error would hide the status a test is about.
    with OpenAI(api_key=account.token, base_url=f"{server.ai_url(account)}/v1", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tuned(server: LiveServer, peft_adapter: Any) -> tuple[Account, dict[str, Any]]:
    """An account with one real, usable finetune (a PEFT adapter for the served model's shapes)."""
    owner = server.new_account("openai")
    return owner, create_finetune(server, owner, "openai-style", peft_adapter())


def run(
    server: LiveServer, account: Account, body: dict[str, Any], model: str = LORA_MODEL
) -> dict[str, Any]:
    response = httpx.post(server.run_url(account, model), headers=account.headers, json=body, timeout=60)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["result"]
    return result


def test_chat_completion_matches_run(client: OpenAI, server: LiveServer, account: Account) -> None:
    out = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    same = run(server, account, {"messages": MESSAGES, "max_tokens": 6, "temperature": 0})
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == LORA_MODEL
    [choice] = out.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == same["response"]
    assert choice.finish_reason == "length"
    counts = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert out.usage is not None
    assert out.usage.model_dump(include=counts) == {k: same["usage"][k] for k in counts}


def test_chat_streaming_chunks(client: OpenAI) -> None:
    whole = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=LORA_MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    # The last choice chunk carries the finish reason; then one usage chunk without choices.
    *body, finish, tail = chunks
    assert finish.choices[0].finish_reason == "length" and not finish.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in body)
    assert tail.choices == [] and tail.usage is not None and tail.usage.completion_tokens == 8
    assert len([c for c in body if c.choices[0].delta.content]) > 1  # streamed, not one lump
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content


def test_stream_without_include_usage_has_no_usage_chunk(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=3, stream=True)
    )
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_are_raw_prompts(client: OpenAI, server: LiveServer, account: Account) -> None:
    prompt = "[INST] write a haiku [/INST]"
    out = client.completions.create(model=LORA_MODEL, prompt=prompt, max_tokens=5, temperature=0)
    same = run(server, account, {"prompt": prompt, "raw": True, "max_tokens": 5, "temperature": 0})
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == same["response"] and out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.prompt_tokens == same["usage"]["prompt_tokens"]
    chunks = list(client.completions.create(model=LORA_MODEL, prompt=[prompt], max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == same["response"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == same["usage"]["total_tokens"]


def test_finetune_by_lora_field_and_model_suffix(
    server: LiveServer, tuned: tuple[Account, dict[str, Any]]
) -> None:
    owner, finetune = tuned
    body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    expected = run(server, owner, {**body, "lora": "openai-style"})["response"]
    assert expected != run(server, owner, body)["response"]
    with OpenAI(api_key=owner.token, base_url=f"{server.ai_url(owner)}/v1", max_retries=0) as client:
        by_field = client.chat.completions.create(
            model=LORA_MODEL, extra_body={"lora": finetune["id"]}, **body
        )
        by_suffix = client.chat.completions.create(model=f"{LORA_MODEL}:openai-style", **body)
        via_base_name = client.chat.completions.create(model=f"{BASE_NAME}:openai-style", **body)
        streamed = client.chat.completions.create(model=f"{LORA_MODEL}:{finetune['id']}", stream=True, **body)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        completion = client.completions.create(model=f"{LORA_MODEL}:openai-style", prompt="[INST] hi [/INST]",
                                               max_tokens=4, temperature=0)
        listed = [m.id for m in client.models.list()]
        retrieved = client.models.retrieve(f"{LORA_MODEL}:openai-style")
    assert [by_field.choices[0].message.content, by_suffix.choices[0].message.content,
            via_base_name.choices[0].message.content, text] == [expected] * 4
    assert by_suffix.model == f"{LORA_MODEL}:openai-style"
    raw = run(server, owner, {"prompt": "[INST] hi [/INST]", "raw": True, "max_tokens": 4, "temperature": 0,
                              "lora": "openai-style"})
    assert completion.choices[0].text == raw["response"]
    assert listed == [*sorted([LORA_MODEL, NO_LORA_MODEL]), f"{LORA_MODEL}:openai-style"]
    assert retrieved.owned_by == owner.id


def test_sampling_parameters_are_mapped(client: OpenAI, server: LiveServer, account: Account) -> None:
    params: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9, "seed": 42, "frequency_penalty": 0.5,
                              "presence_penalty": 0.5}
    a = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_completion_tokens=7, **params)
    b = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=7, n=1, **params)
    same = run(server, account, {"messages": MESSAGES, "max_tokens": 7, **params})
    assert a.choices[0].message.content == b.choices[0].message.content == same["response"]
    assert a.usage is not None and a.usage.completion_tokens == 7
    # OpenAI's ranges reach beyond Workers AI's: negative penalties and seed 0 are accepted.
    c = client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, max_tokens=3, seed=0,
                                       frequency_penalty=-1.5, presence_penalty=-0.5)
    assert c.usage is not None and c.usage.completion_tokens == 3


def test_stop_sequences_cut_the_text(client: OpenAI) -> None:
    full = client.completions.create(
        model=LORA_MODEL, prompt="once", max_tokens=24, temperature=0
    ).choices[0].text
    assert len(full) > 6
    stop = full[3:6]  # wherever the sequence first occurs, the text ends right before it
    cut = full[: full.index(stop)]
    out = client.completions.create(
        model=LORA_MODEL, prompt="once", max_tokens=24, temperature=0, stop=[stop, "\x00"]
    )
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens < 24  # generation stopped early
    chunks = list(client.completions.create(model=LORA_MODEL, prompt="once", max_tokens=24, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    never = client.completions.create(
        model=LORA_MODEL, prompt="once", max_tokens=24, temperature=0, stop="\x01"
    )
    assert never.choices[0].text == full and never.choices[0].finish_reason == "length"


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == "abc"  # "E" may start "END"
    assert m.feed("N") == ""
    assert m.feed("Dzzz") == "" and m.stopped
    m = StopMatcher(["END"])
    assert m.feed("aEN") == "a" and m.feed("x") == "ENx" and m.flush() == ""
    assert StopMatcher([]).feed("anything") == "anything"


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    error: dict[str, Any] = body["error"]
    return error


def test_errors_have_openais_shape(client: OpenAI, server: LiveServer, account: Account) -> None:
    with (OpenAI(api_key="wrong", base_url=f"{server.ai_url(account)}/v1", max_retries=0) as bad,
          pytest.raises(openai.AuthenticationError) as auth):
        bad.chat.completions.create(model=LORA_MODEL, messages=MESSAGES)
    assert auth.value.status_code == 401
    assert error_body(auth.value) == {"message": "Authentication error", "type": "authentication_error",
                                      "param": None, "code": "invalid_api_key"}
    with pytest.raises(openai.BadRequestError) as model:
        client.chat.completions.create(model="@cf/nope/nothing", messages=MESSAGES)
    assert error_body(model.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, n=2)
    assert error_body(n.value)["type"] == "invalid_request_error" and "n:" in n.value.message
    with pytest.raises(openai.NotFoundError) as finetune:
        client.chat.completions.create(model=f"{LORA_MODEL}:no-such-finetune", messages=MESSAGES)
    assert error_body(finetune.value)["code"] == "3037"
    with pytest.raises(openai.APIStatusError) as no_lora:
        client.completions.create(model=f"{NO_LORA_MODEL}:x", prompt="hi")
    assert no_lora.value.status_code == 405 and error_body(no_lora.value)["code"] == "5005"
    with pytest.raises(openai.APIStatusError) as window:
        client.completions.create(model=LORA_MODEL, prompt="hi", max_tokens=100_000)
    assert window.value.status_code == 413 and error_body(window.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model=LORA_MODEL, messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert "tools" in error_body(tools.value)["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LORA_MODEL, messages=[{"role": "user", "content": "x"}],
                                       temperature=9)


def test_raw_http_errors_on_v1_paths(server: LiveServer, account: Account) -> None:
    base = f"{server.ai_url(account)}/v1"
    broken = httpx.post(f"{base}/chat/completions", headers=account.headers, content=b"{not json")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "3003"
    unknown = httpx.get(f"{base}/embeddings", headers=account.headers)
    assert unknown.status_code == 404 and "error" in unknown.json()
    # The Workers AI routes keep their envelope.
    run = httpx.post(server.run_url(account), headers=account.headers, content=b"{not json")
    assert run.status_code == 400 and run.json()["errors"][0]["code"] == 3003


def wait_until(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def idle(backend: Any) -> bool:
    stats = backend.stats()
    return bool(stats["running"] == 0 and stats["queue_depth"] == 0 and stats["kv_blocks_used"] == 0)


def test_hanging_up_a_stream_aborts_the_generation(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    assert wait_until(lambda: idle(tiny_backend), 3.0)
    body = {"model": LORA_MODEL, "prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.ai_url(account)}/v1/completions", headers=account.headers, json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: {")
        assert wait_until(lambda: tiny_backend.stats()["running"] == 1, 3.0)
    # A whole run takes seconds; the abort frees everything at once.
    assert wait_until(lambda: idle(tiny_backend), 0.5), tiny_backend.stats()


def test_timeout_and_rate_limit_errors(strict_server: LiveServer) -> None:
    account = strict_server.new_account()
    base = f"{strict_server.ai_url(account)}/v1"
    body = {"model": LORA_MODEL, "prompt": "hi", "max_tokens": 2000, "temperature": 0}
    whole = httpx.post(f"{base}/completions", headers=account.headers, json=body, timeout=30)
    assert whole.status_code == 408 and whole.json()["error"]["type"] == "timeout_error"
    with httpx.stream("POST", f"{base}/completions", headers=account.headers, json={**body, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "3007"  # then no [DONE]
    assert "data: [DONE]" not in events
    # The third of the account's 3 calls a minute passes; the fourth is OpenAI's 429.
    with OpenAI(api_key=account.token, base_url=base, max_retries=0) as client:
        assert client.completions.create(
            model=LORA_MODEL, prompt="hi", max_tokens=1
        ).choices[0].text is not None
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model=LORA_MODEL, prompt="hi", max_tokens=1)
    assert error_body(limited.value)["code"] == "rate_limit_exceeded"

"""POST /run/{model} over real HTTP: both input shapes, templating, every field and range of
contract section 1, model routing and LoRA (contract sections 1, 2 and 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from loraserve.chat_template import ChatTemplate, unscoped_messages
from loraserve.types import ChatMessage

from conftest import BASE_NAME, LORA_MODEL, NO_LORA_MODEL, Account, LiveServer, create_finetune

LLAMA2 = ChatTemplate.llama2()


def run(
    server: LiveServer, account: Account, body: dict[str, Any], model: str = LORA_MODEL
) -> httpx.Response:
    return httpx.post(server.run_url(account, model), headers=account.headers, json=body, timeout=60)


def result(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    assert set(body["result"]) == {"response", "usage"}
    out: dict[str, Any] = body["result"]
    return out


def error(response: httpx.Response, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["result"] is None and body["success"] is False and body["messages"] == []
    assert [e["code"] for e in body["errors"]] == [code]
    message: str = body["errors"][0]["message"]
    return message


def test_prompt_is_wrapped_in_the_default_system_prompt(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    out = result(run(server, account, {"prompt": "tell me a story", "max_tokens": 4, "temperature": 0}))
    expected = len(tiny_backend.encode(LLAMA2.render(unscoped_messages("tell me a story"))))
    assert out["usage"] == {"prompt_tokens": expected, "completion_tokens": 4, "total_tokens": expected + 4,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert isinstance(out["response"], str) and out["response"]


@pytest.mark.parametrize("raw", [True, "true"])
def test_raw_prompt_goes_to_the_tokenizer_as_is(
    server: LiveServer, account: Account, tiny_backend: Any, raw: Any
) -> None:
    prompt = "<s>[INST]comedian[/INST]</s>\n[INST]tell me a joke about cloudflare[/INST]"
    out = result(run(server, account, {"prompt": prompt, "raw": raw, "max_tokens": 2}))
    assert out["usage"]["prompt_tokens"] == len(tiny_backend.encode(prompt))


def test_raw_false_string_applies_the_template(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    out = result(run(server, account, {"prompt": "hi", "raw": "false", "max_tokens": 1}))
    assert out["usage"]["prompt_tokens"] == len(tiny_backend.encode(LLAMA2.render(unscoped_messages("hi"))))


def test_messages_are_rendered_without_a_default_system_prompt(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Tell me more"},
    ]
    out = result(run(server, account, {"messages": messages, "max_tokens": 2}))
    rendered = LLAMA2.render([ChatMessage(m["role"], m["content"]) for m in messages])
    assert out["usage"]["prompt_tokens"] == len(tiny_backend.encode(rendered))


def test_max_tokens_defaults_to_256(server: LiveServer, account: Account) -> None:
    out = result(run(server, account, {"prompt": "count", "temperature": 0}))
    assert out["usage"]["completion_tokens"] == 256


def test_seed_makes_sampling_reproducible(server: LiveServer, account: Account) -> None:
    body = {"prompt": "once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    first, second = (result(run(server, account, body))["response"] for _ in range(2))
    other = result(run(server, account, {**body, "seed": 4321}))["response"]
    assert first == second
    assert other != first


def test_temperature_zero_is_greedy(server: LiveServer, account: Account) -> None:
    body = {"prompt": "once upon a time", "max_tokens": 12, "temperature": 0}
    first, second = (result(run(server, account, body)) for _ in range(2))
    assert first["response"] == second["response"]
    # ... though the second took the first's prompt K/V from the prefix cache.
    cached = [out["usage"]["prompt_tokens_details"]["cached_tokens"] for out in (first, second)]
    assert cached[0] == 0 < cached[1]


def test_every_field_at_its_limits_is_accepted(server: LiveServer, account: Account) -> None:
    body = {
        "prompt": "x", "max_tokens": 1, "temperature": 5, "top_p": 2, "top_k": 50, "seed": 9_999_999_999,
        "repetition_penalty": 2, "frequency_penalty": 2, "presence_penalty": 2, "stream": False, "raw": False,
    }
    result(run(server, account, body))
    low = {**body, "temperature": 0, "top_p": 0, "top_k": 1, "seed": 1, "repetition_penalty": 0,
           "frequency_penalty": 0, "presence_penalty": 0}
    result(run(server, account, low))


def test_unknown_fields_are_ignored(server: LiveServer, account: Account) -> None:
    body = {"prompt": "x", "max_tokens": 1, "response_format": {"type": "json_object"}, "whatever": [1, 2]}
    result(run(server, account, body))


def test_the_docs_curl_form_is_accepted(server: LiveServer, account: Account) -> None:
    # The seed's curl: `-d '{...}'` (so form-urlencoded) with "raw" as a string.
    response = httpx.post(
        server.run_url(account),
        headers={**account.headers, "Content-Type": "application/x-www-form-urlencoded"},
        content=b'{"prompt": "tell me a story", "raw": "true", "max_tokens": 2}',
    )
    result(response)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 131073}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "raw": "maybe"}, "raw"),
        ({"prompt": "x", "stream": "sometimes"}, "stream"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "temperature": 5.01}, "temperature"),
        ({"prompt": "x", "top_p": 2.01}, "top_p"),
        ({"prompt": "x", "top_k": 0}, "top_k"),
        ({"prompt": "x", "top_k": 51}, "top_k"),
        ({"prompt": "x", "seed": 0}, "seed"),
        ({"prompt": "x", "seed": 10_000_000_000}, "seed"),
        ({"prompt": "x", "repetition_penalty": 2.5}, "repetition_penalty"),
        ({"prompt": "x", "frequency_penalty": -1}, "frequency_penalty"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "lora": ""}, "lora"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x" * 131073}]}, "messages.0.content"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt, messages"),
        ({"max_tokens": 3}, "prompt, messages"),
    ],
)
def test_schema_errors_name_the_field(
    server: LiveServer, account: Account, body: dict[str, Any], field: str
) -> None:
    message = error(run(server, account, body), 400, 5006)
    assert message.startswith("AiError: Bad input: ")
    assert field in message


def test_prompt_plus_max_tokens_beyond_the_context_window(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    window = tiny_backend.info.context_window
    prompt = "hello " * (window - 10)
    prompt_tokens = len(tiny_backend.encode(prompt))
    room = window - prompt_tokens
    assert 0 < room < 20
    message = error(run(server, account, {"prompt": prompt, "raw": True, "max_tokens": room + 1}), 413, 5021)
    assert message == (
        f"The estimated number of input and maximum output tokens ({window + 1}) exceeded this "
        f"model context window limit ({window})"
    )
    # The default max_tokens counts too.
    error(run(server, account, {"prompt": prompt, "raw": True}), 413, 5021)
    # Exactly the window is fine.
    out = result(run(server, account, {"prompt": prompt, "raw": True, "max_tokens": room, "temperature": 0}))
    assert out["usage"]["total_tokens"] <= window


def test_unknown_model(server: LiveServer, account: Account) -> None:
    message = error(run(server, account, {"prompt": "x"}, model="@cf/nope/nothing"), 400, 5007)
    assert message == "No such model @cf/nope/nothing or task"
    # The base name is served only as the LoRA model's alias, i.e. with a `lora`.
    error(run(server, account, {"prompt": "x"}, model=BASE_NAME), 400, 5007)
    # A catalog model this server was not started with: the same error, and how to serve it.
    known = "@cf/mistral/mistral-7b-instruct-v0.2-lora"
    message = error(run(server, account, {"prompt": "x"}, model=known), 400, 5007)
    assert message.startswith(f"No such model {known} or task: ") and f"--model {known}=PATH" in message


def test_lora_on_a_model_without_lora_support(server: LiveServer, account: Account) -> None:
    result(run(server, account, {"prompt": "x", "max_tokens": 1}, model=NO_LORA_MODEL))
    error(run(server, account, {"prompt": "x", "lora": "anything"}, model=NO_LORA_MODEL), 405, 5005)


def test_unknown_finetune(server: LiveServer, account: Account) -> None:
    error(run(server, account, {"prompt": "x", "lora": "no-such-finetune"}), 404, 3037)
    error(run(server, account, {"prompt": "x", "lora": "00000000-0000-0000-0000-000000000000"}), 404, 3037)


def test_finetune_without_its_files(server: LiveServer, account: Account) -> None:
    create_finetune(server, account, "empty")
    message = error(run(server, account, {"prompt": "x", "lora": "empty"}), 400, 3039)
    assert "adapter_config.json" in message and "adapter_model.safetensors" in message


def test_lora_changes_the_output_by_id_name_and_base_name(
    server: LiveServer, account: Account, peft_adapter: Any
) -> None:
    finetune = create_finetune(server, account, "styled", peft_adapter())
    body: dict[str, Any] = {"prompt": "tell me a story", "max_tokens": 8, "temperature": 0}
    plain = result(run(server, account, body))
    by_id = result(run(server, account, {**body, "lora": finetune["id"]}))
    by_name = result(run(server, account, {**body, "lora": "styled"}))
    via_alias = result(run(server, account, {**body, "lora": "styled"}, model=BASE_NAME))
    messages = result(run(server, account, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                            "lora": "styled"}))
    assert by_id["response"] == by_name["response"] == via_alias["response"]
    assert by_id["response"] != plain["response"]
    assert messages["usage"]["completion_tokens"] == 4


def test_response_carries_a_request_id(server: LiveServer, account: Account) -> None:
    response = run(server, account, {"prompt": "x", "max_tokens": 1})
    assert len(response.headers["cf-ai-req-id"]) == 32


def test_healthz_lists_the_served_models(server: LiveServer) -> None:
    response = httpx.get(f"{server.base_url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": sorted([LORA_MODEL, NO_LORA_MODEL])}


def test_adapter_folder_is_peft_made(peft_adapter: Any) -> None:
    folder: Path = peft_adapter()
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

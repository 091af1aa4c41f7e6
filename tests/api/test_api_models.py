"""GET /ai/models/search and /ai/models/schema over real HTTP, and through the `cloudflare` SDK.
The published schema is checked against what the server really accepts and answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from cloudflare import Cloudflare

from loraserve import catalog
from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.registry import Registry

from conftest import BASE_NAME, LORA_MODEL, NO_LORA_MODEL, Account, LiveServer


def search(server: LiveServer, account: Account, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{server.ai_url(account)}/models/search", headers=account.headers, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["success"] is True and body["errors"] == []
    return body


def names(body: dict[str, Any]) -> list[str]:
    return [m["name"] for m in body["result"]]


def test_search_lists_served_models_in_workers_ai_shape(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    body = search(server, account)
    assert names(body) == sorted([LORA_MODEL, NO_LORA_MODEL])
    assert body["result_info"] == {"page": 1, "per_page": 50, "count": 2, "total_count": 2}
    lora = body["result"][0]
    assert set(lora) == {"id", "name", "description", "source", "task", "tags", "properties"}
    assert set(lora["task"]) == {"id", "name", "description"} and lora["task"]["name"] == "Text Generation"
    assert "LoRA" in lora["description"]
    props = {p["property_id"]: p["value"] for p in lora["properties"]}
    assert props == {"context_window": str(tiny_backend.info.context_window), "lora": "true", "beta": "true"}
    other = {p["property_id"]: p["value"] for p in body["result"][1]["properties"]}
    assert other["lora"] == "false" and other["beta"] == "false"
    assert search(server, account)["result"][0]["id"] == lora["id"]  # ids are stable


def test_search_filters_and_pages(server: LiveServer, account: Account) -> None:
    assert names(search(server, account, search="LLAMA-2")) == [LORA_MODEL]
    assert names(search(server, account, search="dedicated to inference")) == [LORA_MODEL]  # the description
    assert names(search(server, account, author="meta-llama")) == [LORA_MODEL]
    assert names(search(server, account, author="test")) == [NO_LORA_MODEL]
    assert len(names(search(server, account, task="text generation"))) == 2
    assert names(search(server, account, task="Translation")) == []
    assert names(search(server, account, search="nothing like it")) == []
    first = search(server, account, per_page=1, page=1)
    second = search(server, account, per_page=1, page=2)
    assert names(first) + names(second) == sorted([LORA_MODEL, NO_LORA_MODEL])
    assert second["result_info"] == {"page": 2, "per_page": 1, "count": 1, "total_count": 2}
    assert names(search(server, account, per_page=1, page=3)) == []


def test_search_rejects_bad_paging_and_needs_a_token(server: LiveServer, account: Account) -> None:
    url = f"{server.ai_url(account)}/models/search"
    bad = httpx.get(url, headers=account.headers, params={"page": 0})
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 5006
    assert "page" in bad.json()["errors"][0]["message"]
    assert httpx.get(url).status_code == 401
    assert httpx.get(
        f"{server.ai_url(account)}/models/schema", params={"model": LORA_MODEL}
    ).status_code == 401


def get_schema(server: LiveServer, account: Account, model: str) -> httpx.Response:
    return httpx.get(
        f"{server.ai_url(account)}/models/schema", headers=account.headers, params={"model": model}
    )


def test_schema_is_what_run_validates(server: LiveServer, account: Account) -> None:
    response = get_schema(server, account, LORA_MODEL)
    assert response.status_code == 200, response.text
    schema = response.json()["result"]
    assert set(schema) == {"input", "output"} and "$ref" not in response.text
    validator = jsonschema.Draft202012Validator(schema["input"])
    validator.check_schema(schema["input"])
    cases: list[dict[str, Any]] = [
        {"prompt": "hi", "max_tokens": 2},
        {"prompt": "hi", "raw": True, "max_tokens": 1, "temperature": 0, "top_k": 5, "seed": 3},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "max_tokens": 1},
        {"prompt": ""},
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "temperature": 5.5},
        {"prompt": "hi", "top_k": 51},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"nothing": True},
    ]
    for body in cases:
        run = httpx.post(server.run_url(account), headers=account.headers, json=body, timeout=60)
        assert run.status_code in (200, 400), run.text
        assert validator.is_valid(body) == (run.status_code == 200), body
        if run.status_code == 200:
            jsonschema.validate(run.json()["result"], schema["output"]["oneOf"][0])
    streamed = [s for s in schema["output"]["oneOf"] if s.get("contentType") == "text/event-stream"]
    assert streamed == [{"type": "string", "contentType": "text/event-stream", "format": "binary"}]


def test_schema_for_aliases_and_unknown_models(server: LiveServer, account: Account) -> None:
    assert get_schema(server, account, BASE_NAME).status_code == 200  # the "-lora" variant's base name
    unknown = get_schema(server, account, "@cf/nope/nothing")
    assert unknown.status_code == 400 and unknown.json()["errors"][0]["code"] == 5007
    missing = httpx.get(f"{server.ai_url(account)}/models/schema", headers=account.headers)
    assert missing.status_code == 400 and "model" in missing.json()["errors"][0]["message"]


@pytest.fixture
def cf(server: LiveServer, account: Account) -> Any:
    client = Cloudflare(api_token=account.token, base_url=server.base_url + "/client/v4", max_retries=0)
    yield client
    client.close()


def test_cloudflare_sdk_lists_models_and_reads_schemas(cf: Cloudflare, account: Account) -> None:
    listed: list[Any] = list(cf.ai.models.list(account_id=account.id, per_page=1))  # pages through all
    assert [m["name"] for m in listed] == sorted([LORA_MODEL, NO_LORA_MODEL])
    found: list[Any] = list(cf.ai.models.list(account_id=account.id, search="llama", task="Text Generation"))
    assert [m["name"] for m in found] == [LORA_MODEL]
    schema: Any = cf.ai.models.schema.get(account_id=account.id, model=LORA_MODEL)
    as_dict = schema.to_dict()
    assert as_dict["input"]["type"] == "object" and len(as_dict["input"]["oneOf"]) == 2
    assert len(as_dict["output"]["oneOf"]) == 2


# Workers AI's ids of the other families, served (on the tiny random weights) as `serve --model ID=...` would.
GEMMA_LORA, GEMMA3 = "@cf/google/gemma-2b-it-lora", "@cf/google/gemma-3-12b-it"
QWQ, LLAMA32_1B = "@cf/qwen/qwq-32b", "@cf/meta/llama-3.2-1b-instruct"


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory, tiny_backend: Any) -> Iterator[LiveServer]:
    registry = Registry.open(tmp_path_factory.mktemp("families-registry"))
    backends = {model: tiny_backend for model in (GEMMA_LORA, GEMMA3, QWQ, LLAMA32_1B)}
    with BackgroundServer(create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))) as live:
        yield LiveServer(live.base_url, registry, backends)
    registry.close()


def test_search_lists_the_families_with_their_catalog_properties(
    families: LiveServer, tiny_backend: Any
) -> None:
    account = families.new_account()
    body = search(families, account)
    assert names(body) == sorted([GEMMA_LORA, GEMMA3, QWQ, LLAMA32_1B])
    listed = {m["name"]: m for m in body["result"]}
    for model_id, model in listed.items():
        entry = catalog.find(model_id)
        assert entry is not None
        assert model["description"] == entry.description and model["task"]["name"] == "Text Generation"
        props = {p["property_id"]: p["value"] for p in model["properties"]}
        # Workers AI's window where the engine holds that much, else the engine's (the tiny one holds less).
        window = min(entry.context_window, tiny_backend.info.context_window)
        assert props == {
            "context_window": str(window),
            "lora": "true" if model_id != LLAMA32_1B else "false",  # Gemma 3 takes adapters without "-lora"
            "beta": "true" if model_id == GEMMA_LORA else "false",
        }, model_id
    assert names(search(families, account, author="google")) == [GEMMA_LORA, GEMMA3]
    assert names(search(families, account, search="reasoning model")) == [QWQ]
    # The base name of a "-lora" id has a schema too, as it routes to the -lora model with a `lora`.
    assert get_schema(families, account, "@cf/google/gemma-2b-it").status_code == 200

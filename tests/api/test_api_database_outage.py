"""A live server on PostgreSQL whose database goes away: every authenticated route answers 429 / 3040 (the
OpenAI routes in OpenAI's shape), never a 500, an upload leaves nothing behind, and the same server serves
every route again once the database is back, without a restart.

A token that authenticated a moment ago is still in the registry's token cache, and passes without the
database (token_cache.py): its runs without a finetune are served through the outage. Here the cache keeps
tokens for an hour, so that which token is cached does not depend on timing. Skipped only where
PostgreSQL or psycopg is missing (pg_helpers.py).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.registry import AssetFile, Registry, synth
from loraserve.registry.token_cache import TokenCache

from conftest import LORA_MODEL, Account, LiveServer, ok, upload
from pg_helpers import PostgresServer

TRY_AGAIN = "Capacity temporarily exceeded: the registry database is unavailable, please try again."
RUN = {"prompt": "x", "max_tokens": 1}


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def live(pg_server: PostgresServer, tmp_path: Path, tiny_backend: Any) -> Iterator[LiveServer]:
    registry = Registry.open(tmp_path, pg_server.new_database())
    registry.token_cache = TokenCache(ttl_s=3600)
    backends = {LORA_MODEL: tiny_backend}
    app = create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))
    try:
        with BackgroundServer(app) as server:
            yield LiveServer(server.base_url, registry, backends)
    finally:
        if not pg_server.running():
            pg_server.start()
        registry.close()


def _ready_finetune(server: LiveServer, account: Account, name: str, base: Any) -> str:
    """Made through the registry, not HTTP: the account's token stays out of the token cache."""
    finetune = server.registry.create_finetune(account.id, LORA_MODEL, name)
    blobs = {AssetFile.CONFIG: synth.adapter_config(4, 8),
             AssetFile.WEIGHTS: synth.encode_safetensors(synth.lora_tensors(base, 4))}
    for file, blob in blobs.items():
        server.registry.add_asset(account.id, finetune.id, file.value, io.BytesIO(blob), base)
    return finetune.id


def _calls(server: LiveServer, account: Account) -> dict[str, httpx.Request]:
    """Every authenticated route, as the account calls it; each succeeds while the database is up."""
    ai = server.ai_url(account)
    tokens = f"{server.base_url}/client/v4/accounts"
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    config = synth.adapter_config(4, 8)
    requests = {
        "run": httpx.Request("POST", server.run_url(account), json=RUN),
        "run with a finetune": httpx.Request("POST", server.run_url(account), json={**RUN, "lora": "ready"}),
        "finetunes": httpx.Request("GET", f"{ai}/finetunes"),
        "public finetunes": httpx.Request("GET", f"{ai}/finetunes/public"),
        "create finetune": httpx.Request("POST", f"{ai}/finetunes",
                                         json={"model": LORA_MODEL, "name": "new"}),
        "get finetune": httpx.Request("GET", f"{ai}/finetunes/ready"),
        "delete finetune": httpx.Request("DELETE", f"{ai}/finetunes/doomed"),
        "upload": httpx.Request("POST", f"{ai}/finetunes/empty/finetune-assets",
                                data={"file_name": AssetFile.CONFIG.value}, files={"file": ("blob", config)}),
        "models search": httpx.Request("GET", f"{ai}/models/search"),
        "openai models": httpx.Request("GET", f"{ai}/v1/models"),
        "openai chat": httpx.Request("POST", f"{ai}/v1/chat/completions", json={"model": LORA_MODEL, **chat}),
        "openai chat with a finetune": httpx.Request("POST", f"{ai}/v1/chat/completions",
                                                     json={"model": f"{LORA_MODEL}:ready", **chat}),
        "openai completions": httpx.Request("POST", f"{ai}/v1/completions",
                                            json={"model": LORA_MODEL, "prompt": "x", "max_tokens": 1}),
        "verify token": httpx.Request("GET", f"{tokens}/{account.id}/tokens/verify"),
        "accounts": httpx.Request("GET", tokens),
    }
    for request in requests.values():
        request.headers.update(account.headers)
    return requests


def _is_try_again(response: httpx.Response) -> bool:
    """429 / 3040 with the registry's message, in the route's own error shape."""
    if response.status_code != 429:
        return False
    body = response.json()
    if "/ai/v1/" in str(response.url):
        return (body["error"]["code"], body["error"]["message"]) == ("3040", TRY_AGAIN)
    return body["result"] is None and body["errors"] == [{"code": 3040, "message": TRY_AGAIN}]


def test_routes_answer_3040_while_the_database_is_down_and_serve_again_after(
    live: LiveServer, pg_server: PostgresServer, tiny_backend: Any
) -> None:
    fresh = live.new_account("fresh")  # its token is never checked before the outage
    cached = live.new_account("cached")  # authenticated just before it
    empty: dict[str, str] = {}
    for account in (fresh, cached):
        _ready_finetune(live, account, "ready", tiny_backend.info)
        live.registry.create_finetune(account.id, LORA_MODEL, "doomed")
        empty[account.id] = live.registry.create_finetune(account.id, LORA_MODEL, "empty").id
    client = httpx.Client(timeout=60)
    ok(client.post(live.run_url(cached), headers=cached.headers, json=RUN))

    pg_server.stop()
    answers = {name: client.send(request) for name, request in _calls(live, fresh).items()}
    assert {name: r.status_code for name, r in answers.items() if not _is_try_again(r)} == {}
    # A cached token still passes: a run without a finetune needs no database and is served.
    ok(client.post(live.run_url(cached), headers=cached.headers, json=RUN))
    cached_calls = _calls(live, cached)
    for name in ("run with a finetune", "finetunes", "upload", "openai models", "verify token"):
        assert _is_try_again(client.send(cached_calls[name])), name
    for account in (fresh, cached):  # the refused uploads left no file, not even a temp one
        directory = live.registry.storage.directory(empty[account.id])
        assert not directory.exists() or list(directory.iterdir()) == []

    pg_server.start()  # the same server process and registry
    answers = {name: client.send(request) for name, request in _calls(live, fresh).items()}
    assert {name: r.status_code for name, r in answers.items() if r.status_code != 200} == {}
    assert not live.registry.get_finetune(cached.id, "empty").has_config  # its upload was refused
    ok(upload(live, cached, "empty", AssetFile.CONFIG.value, synth.adapter_config(4, 8)))
    ok(client.post(live.run_url(cached), headers=cached.headers, json={**RUN, "lora": "ready"}))
    client.close()

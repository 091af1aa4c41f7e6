"""Two accounts on one server: a private finetune is invisible to the other account, whatever the
route and whether it is named by id or by name; every account route refuses a missing, foreign or
revoked token; and what a foreign finetune answers cannot be told apart from a finetune that never
existed. The route list is read from the app itself, so a new route is covered the day it lands."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from loraserve.api import create_app
from loraserve.api.app import ACCOUNT_PREFIX

from conftest import BASE_NAME, LORA_MODEL, Account, LiveServer, create_finetune, fails


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    """(status, code, message) of a Workers AI envelope or, on /v1 paths, an OpenAI error body."""
    body = response.json()
    if "error" in body:
        return response.status_code, str(body["error"]["code"]), body["error"]["message"]
    assert body["success"] is False and body["result"] is None, body
    (first,) = body["errors"]
    return response.status_code, str(first["code"]), first["message"]


@dataclass(frozen=True)
class World:
    alice: Account
    bob: Account
    secret: dict[str, Any]  # Bob's private finetune, ready
    shared: dict[str, Any]  # Bob's public finetune, ready
    folder: Any


@pytest.fixture(scope="module")
def world(server: LiveServer, peft_adapter: Any) -> World:
    alice, bob = server.new_account("alice"), server.new_account("bob")
    folder = peft_adapter()
    secret = create_finetune(server, bob, "bobs-secret", folder)
    shared = create_finetune(server, bob, "bobs-shared", folder, public=True)
    return World(alice, bob, secret, shared, folder)


def account_routes(server: LiveServer) -> Iterator[tuple[str, str]]:
    """(method, path template) of every account route the app serves, as its OpenAPI document lists them."""
    paths: dict[str, dict[str, Any]] = create_app(server.registry, server.backends).openapi()["paths"]
    for path, operations in sorted(paths.items()):
        if path.startswith(ACCOUNT_PREFIX):
            for method in sorted(operations):
                yield method.upper(), path


def fill(template: str, account_id: str, ref: str) -> str:
    path = template.replace("{account_id}", account_id).replace("{ref}", ref)
    return re.sub(r"\{model(:path)?\}", LORA_MODEL, path)


def test_the_matrix_covers_every_kind_of_route(server: LiveServer) -> None:
    paths = {path.removeprefix(ACCOUNT_PREFIX) for _, path in account_routes(server)}
    for expected in ("/run/{model}", "/finetunes", "/finetunes/{ref}", "/finetunes/{ref}/finetune-assets",
                     "/finetunes/public", "/models/search", "/models/schema", "/v1/chat/completions",
                     "/v1/completions", "/v1/models"):
        assert expected in paths


def test_every_account_route_refuses_a_missing_foreign_or_revoked_token(
    server: LiveServer, world: World
) -> None:
    revoked = server.registry.create_token(world.bob.id)
    server.registry.revoke_token(revoked)
    bad_headers: dict[str, dict[str, str]] = {
        "none": {},
        "bare scheme": {"Authorization": "Bearer"},
        "other scheme": {"Authorization": f"Basic {world.bob.token}"},
        "garbage": {"Authorization": "Bearer not-a-token"},
        "alice's token": world.alice.headers,
        "bob's revoked token": {"Authorization": f"Bearer {revoked}"},
    }
    checked = 0
    for method, template in account_routes(server):
        url = server.base_url + fill(template, world.bob.id, world.secret["id"])
        body = {"prompt": "x", "max_tokens": 1, "lora": world.secret["id"]} if method == "POST" else None
        for label, headers in bad_headers.items():
            response = httpx.request(method, url, headers=headers, json=body)
            status, error_code, _ = error_of(response)
            assert status == 401, (method, template, label, response.text)
            assert error_code in {"10000", "invalid_api_key"}, (method, template, label, response.text)
            for secret in (world.secret["id"], "bobs-secret", world.bob.token, revoked):
                assert secret not in response.text
            checked += 1
    assert checked >= 6 * 12


def test_a_revoked_token_stops_at_once(server: LiveServer) -> None:
    account = server.new_account("revoke")
    url = server.ai_url(account) + "/finetunes"
    assert httpx.get(url, headers=account.headers).status_code == 200
    server.registry.revoke_token(account.token)
    fails(httpx.get(url, headers=account.headers), 401, 10000)
    run = httpx.post(server.run_url(account), headers=account.headers, json={"prompt": "x", "max_tokens": 1})
    fails(run, 401, 10000)


def _foreign_requests(server: LiveServer, alice: Account, ref: str, folder: Any) -> dict[str, httpx.Response]:
    """Every way Alice can name a finetune `ref`, and what the server answered."""
    ai = server.ai_url(alice)
    h = alice.headers
    asset = {"file": ("blob", (folder / "adapter_config.json").read_bytes())}
    return {
        "run": httpx.post(server.run_url(alice), headers=h,
                          json={"prompt": "x", "lora": ref, "max_tokens": 1}),
        "run via base name": httpx.post(server.run_url(alice, BASE_NAME), headers=h,
                                        json={"prompt": "x", "lora": ref, "max_tokens": 1}),
        "run stream": httpx.post(server.run_url(alice), headers=h,
                                 json={"prompt": "x", "lora": ref, "max_tokens": 1, "stream": True}),
        "chat model suffix": httpx.post(f"{ai}/v1/chat/completions", headers=h, json={
            "model": f"{LORA_MODEL}:{ref}", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
        "chat lora field": httpx.post(f"{ai}/v1/chat/completions", headers=h, json={
            "model": LORA_MODEL, "lora": ref, "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1}),
        "completion": httpx.post(f"{ai}/v1/completions", headers=h,
                                 json={"model": f"{LORA_MODEL}:{ref}", "prompt": "x", "max_tokens": 1}),
        "v1 model": httpx.get(f"{ai}/v1/models/{LORA_MODEL}:{ref}", headers=h),
        "get": httpx.get(f"{ai}/finetunes/{ref}", headers=h),
        "delete": httpx.delete(f"{ai}/finetunes/{ref}", headers=h),
        "upload": httpx.post(f"{ai}/finetunes/{ref}/finetune-assets", headers=h,
                             data={"file_name": "adapter_config.json"}, files=asset),
    }


def test_a_foreign_private_finetune_answers_exactly_as_one_that_never_existed(
    server: LiveServer, world: World
) -> None:
    for ref, never in (
        (world.secret["id"], "00000000-0000-4000-8000-000000000000"), ("bobs-secret", "nobody-has-it")
    ):
        foreign = _foreign_requests(server, world.alice, ref, world.folder)
        missing = _foreign_requests(server, world.alice, never, world.folder)
        for what, response in foreign.items():
            assert 400 <= response.status_code < 500, (what, response.text)
            status, error_code, message = error_of(response)
            assert (status, error_code, message.replace(ref, "REF")) == (
                *error_of(missing[what])[:2], error_of(missing[what])[2].replace(never, "REF")), what
            if ref != world.secret["id"]:
                assert world.secret["id"] not in response.text, what
    # Nothing of Bob's was touched, and it still runs for him.
    bob_url = server.ai_url(world.bob) + "/finetunes"
    assert world.secret["id"] in {
        f["id"] for f in httpx.get(bob_url, headers=world.bob.headers).json()["result"]
    }
    ok = httpx.post(server.run_url(world.bob), headers=world.bob.headers,
                    json={"prompt": "x", "lora": "bobs-secret", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


def test_listings_show_a_private_finetune_to_its_owner_only(server: LiveServer, world: World) -> None:
    ai = server.ai_url(world.alice)
    h = world.alice.headers
    listings = {
        "finetunes": httpx.get(f"{ai}/finetunes", headers=h),
        "public": httpx.get(f"{ai}/finetunes/public", headers=h),
        "public by name": httpx.get(f"{ai}/finetunes/public", headers=h,
                                    params={"orderBy": "name", "limit": 1000}),
        "v1 models": httpx.get(f"{ai}/v1/models", headers=h),
        "models search": httpx.get(f"{ai}/models/search", headers=h),
    }
    for what, response in listings.items():
        assert response.status_code == 200, (what, response.text)
        assert world.secret["id"] not in response.text and "bobs-secret" not in response.text, what
    public_ids = {f["id"] for f in listings["public"].json()["result"]}
    assert world.shared["id"] in public_ids and world.secret["id"] not in public_ids
    assert listings["finetunes"].json()["result"] == []


def test_a_public_finetune_is_usable_but_not_writable_by_others(server: LiveServer, world: World) -> None:
    ai = server.ai_url(world.alice)
    h = world.alice.headers
    shared_id = world.shared["id"]
    run = httpx.post(server.run_url(world.alice), headers=h,
                     json={"prompt": "x", "lora": shared_id, "max_tokens": 1})
    assert run.status_code == 200, run.text
    assert httpx.get(f"{ai}/finetunes/{shared_id}", headers=h).json()["result"]["id"] == shared_id
    before = sorted((p.name, p.read_bytes()) for p in server.registry.storage.directory(shared_id).iterdir())
    fails(httpx.delete(f"{ai}/finetunes/{shared_id}", headers=h), 404, 3037)
    upload = httpx.post(f"{ai}/finetunes/{shared_id}/finetune-assets", headers=h,
                        data={"file_name": "adapter_config.json"}, files={"file": ("blob", b"{}")})
    fails(upload, 404, 3037)
    after = sorted((p.name, p.read_bytes()) for p in server.registry.storage.directory(shared_id).iterdir())
    assert before == after
    bob_get = httpx.get(server.ai_url(world.bob) + f"/finetunes/{shared_id}", headers=world.bob.headers)
    assert bob_get.json()["result"]["public"] is True


def test_same_name_in_two_accounts(server: LiveServer, peft_adapter: Any) -> None:
    alice, bob = server.new_account("alice"), server.new_account("bob")
    a = create_finetune(server, alice, "shared-name", peft_adapter())
    b = create_finetune(server, bob, "shared-name", peft_adapter(r=4))
    assert a["id"] != b["id"]
    for who, mine in ((alice, a), (bob, b)):
        got = httpx.get(server.ai_url(who) + "/finetunes/shared-name", headers=who.headers).json()["result"]
        assert got["id"] == mine["id"]
    assert httpx.delete(
        server.ai_url(alice) + "/finetunes/shared-name", headers=alice.headers
    ).status_code == 200
    assert httpx.get(server.ai_url(bob) + "/finetunes/shared-name", headers=bob.headers).status_code == 200


def _prefix_hits(server: LiveServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    found = re.search(
        rf'^loraserve_prefix_cache_hit_tokens_total{{model="{re.escape(LORA_MODEL)}"}} (\S+)$', text, re.M
    )
    assert found, "the prefix cache counter is missing from /metrics"
    return float(found.group(1))


def test_accounts_never_share_cached_prompts(server: LiveServer, world: World) -> None:
    """Prefix caching is scoped to the account: a second account's identical prompt is computed anew
    (so its latency reveals nothing of the first's), while the same account reuses its own prefix."""
    prompt = " ".join(f"isolation-{i}" for i in range(40))  # unique to this test: nothing cached yet
    body = {"prompt": prompt, "raw": True, "max_tokens": 1}
    hits = [_prefix_hits(server)]
    for who in (world.alice, world.bob, world.alice):
        assert httpx.post(server.run_url(who), headers=who.headers, json=body).status_code == 200
        hits.append(_prefix_hits(server))
    assert hits[1] == hits[0] and hits[2] == hits[1]  # Alice filled the cache; Bob got nothing from it
    assert hits[3] > hits[2]  # Alice's second request did

"""The finetunes routes of contract section 3 over real HTTP, including exactly what wrangler sends."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx

from conftest import (
    BASE_NAME,
    LORA_MODEL,
    NO_LORA_MODEL,
    Account,
    LiveServer,
    create_finetune,
    fails,
    ok,
    upload,
)

FINETUNE_KEYS = {"id", "name", "description", "model", "public", "created_at", "modified_at"}
ASSET_KEYS = {"id", "finetune_id", "file_name", "bucket_name", "created_at", "modified_at"}
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def test_create_returns_the_finetune(server: LiveServer, account: Account) -> None:
    url = server.ai_url(account) + "/finetunes"
    created = ok(httpx.post(url, headers=account.headers, json={"model": LORA_MODEL, "name": "my-ft"}))
    assert set(created) == FINETUNE_KEYS
    assert uuid.UUID(created["id"])
    assert created["name"] == "my-ft" and created["model"] == LORA_MODEL
    assert created["description"] == "" and created["public"] is False
    assert ISO.fullmatch(created["created_at"]) and ISO.fullmatch(created["modified_at"])
    full = ok(httpx.post(
        url, headers=account.headers,
        json={"model": LORA_MODEL, "name": "second", "description": "about it", "public": True},
    ))
    assert full["description"] == "about it" and full["public"] is True


def test_create_for_the_base_name_stores_the_lora_model(server: LiveServer, account: Account) -> None:
    created = ok(httpx.post(server.ai_url(account) + "/finetunes", headers=account.headers,
                            json={"model": BASE_NAME, "name": "via-base"}))
    assert created["model"] == LORA_MODEL


def test_create_errors(server: LiveServer, account: Account) -> None:
    url = server.ai_url(account) + "/finetunes"

    def create(model: str, name: str) -> httpx.Response:
        return httpx.post(url, headers=account.headers, json={"model": model, "name": name})

    fails(create("@cf/nope/nothing", "a"), 400, 5007)
    fails(create(NO_LORA_MODEL, "a"), 405, 5005)
    ok(create(LORA_MODEL, "taken"))
    assert "already exists" in fails(create(LORA_MODEL, "taken"), 400, 5006)
    assert "cf-public-" in fails(create(LORA_MODEL, "cf-public-mine"), 400, 5006)
    fails(create(LORA_MODEL, "has spaces"), 400, 5006)


def test_account_finetune_limit(strict_server: LiveServer) -> None:
    account = strict_server.new_account()
    url = strict_server.ai_url(account) + "/finetunes"
    for name in ("one", "two"):
        ok(httpx.post(url, headers=account.headers, json={"model": LORA_MODEL, "name": name}))
    fails(httpx.post(url, headers=account.headers, json={"model": LORA_MODEL, "name": "three"}), 429, 3036)


def test_wrangler_create_upload_and_list(server: LiveServer, account: Account, peft_adapter: Any) -> None:
    """Byte for byte what `wrangler ai finetune create/list` send (undici fetch + FormData)."""
    folder: Path = peft_adapter()
    wrangler = {**account.headers, "User-Agent": "wrangler/3.99.0"}
    base = server.ai_url(account)
    # fetch() with a string body: text/plain, not application/json.
    created = ok(httpx.post(
        base + "/finetunes", headers={**wrangler, "Content-Type": "text/plain;charset=UTF-8"},
        content=json.dumps({"model": LORA_MODEL, "name": "from-wrangler", "description": ""}),
    ))
    for file_name in sorted(p.name for p in folder.iterdir() if p.name.startswith("adapter_")):
        # FormData.set("file", new Blob([...])): a part named "blob", typed application/octet-stream.
        asset = ok(httpx.post(
            f"{base}/finetunes/{created['id']}/finetune-assets", headers=wrangler,
            data={"file_name": file_name},
            files={"file": ("blob", (folder / file_name).read_bytes(), "application/octet-stream")},
        ))
        assert set(asset) == ASSET_KEYS
        assert asset["finetune_id"] == created["id"] and asset["file_name"] == file_name
        assert asset["bucket_name"]
    listed = ok(httpx.get(base + "/finetunes?", headers=wrangler))
    assert [f["name"] for f in listed] == ["from-wrangler"]
    out = ok(httpx.post(server.run_url(account), headers=account.headers,
                        json={"prompt": "hi", "lora": "from-wrangler", "max_tokens": 2}))
    assert out["usage"]["completion_tokens"] == 2


def test_upload_by_name_and_with_the_part_filename_only(
    server: LiveServer, account: Account, peft_adapter: Any
) -> None:
    folder: Path = peft_adapter()
    create_finetune(server, account, "by-name")
    ok(upload(
        server, account, "by-name", "adapter_config.json", (folder / "adapter_config.json").read_bytes()
    ))
    # curl -F file=@adapter_model.safetensors, no file_name field: the part's filename says it.
    weights = folder / "adapter_model.safetensors"
    asset = ok(httpx.post(f"{server.ai_url(account)}/finetunes/by-name/finetune-assets",
                          headers=account.headers, files={"file": (weights.name, weights.read_bytes())}))
    assert asset["file_name"] == "adapter_model.safetensors"


def test_upload_errors(server: LiveServer, account: Account, peft_adapter: Any) -> None:
    folder: Path = peft_adapter()
    url = server.ai_url(account) + "/finetunes/errs/finetune-assets"
    create_finetune(server, account, "errs")
    assert "file_name" in fails(upload(server, account, "errs", "model.bin", b"x"), 400, 3039)
    fails(upload(server, account, "errs", "adapter_config.json", b"{not json"), 400, 3039)
    fails(httpx.post(url, headers=account.headers, json={"file_name": "adapter_config.json"}), 400, 3003)
    assert "file" in fails(
        httpx.post(url, headers=account.headers, files={"file_name": (None, "x")}), 400, 5006
    )
    fails(upload(server, account, "no-such", "adapter_config.json", b"{}"), 404, 3037)
    # An adapter made for another model: refused at upload, naming the tensor.
    other = peft_adapter(hidden_delta=16)
    ok(upload(server, account, "errs", "adapter_config.json", (folder / "adapter_config.json").read_bytes()))
    message = fails(upload(server, account, "errs", "adapter_model.safetensors",
                           (other / "adapter_model.safetensors").read_bytes()), 400, 3039)
    assert "_proj" in message


def test_list_get_and_delete_by_id_and_name(server: LiveServer, account: Account) -> None:
    base = server.ai_url(account) + "/finetunes"
    first = create_finetune(server, account, "list-one")
    second = create_finetune(server, account, "list-two")
    assert [f["id"] for f in ok(httpx.get(base, headers=account.headers))] == [first["id"], second["id"]]
    assert ok(httpx.get(f"{base}/{first['id']}", headers=account.headers)) == first
    assert ok(httpx.get(f"{base}/list-two", headers=account.headers)) == second
    assert ok(httpx.delete(f"{base}/{first['id']}", headers=account.headers))["id"] == first["id"]
    assert ok(httpx.delete(f"{base}/list-two", headers=account.headers))["id"] == second["id"]
    assert ok(httpx.get(base, headers=account.headers)) == []
    for ref in (first["id"], "list-two"):
        fails(httpx.get(f"{base}/{ref}", headers=account.headers), 404, 3037)
        fails(httpx.delete(f"{base}/{ref}", headers=account.headers), 404, 3037)


def test_deleted_finetune_can_no_longer_be_run(
    server: LiveServer, account: Account, peft_adapter: Any
) -> None:
    create_finetune(server, account, "short-lived", peft_adapter())
    body = {"prompt": "x", "lora": "short-lived", "max_tokens": 1}
    ok(httpx.post(server.run_url(account), headers=account.headers, json=body))
    ok(httpx.delete(server.ai_url(account) + "/finetunes/short-lived", headers=account.headers))
    fails(httpx.post(server.run_url(account), headers=account.headers, json=body), 404, 3037)


def test_public_list_paging_and_order(server: LiveServer, peft_adapter: Any) -> None:
    owner, reader = server.new_account("pub-owner"), server.new_account("pub-reader")
    names = ["pub-b", "pub-a", "pub-c"]
    for name in names:
        create_finetune(server, owner, name, peft_adapter(), public=True)
    create_finetune(server, owner, "not-public")
    url = server.ai_url(reader) + "/finetunes/public"

    def listed(query: str = "") -> list[str]:
        return [
            f["name"] for f in ok(httpx.get(f"{url}{query}", headers=reader.headers)) if f["name"] in names
        ]

    assert listed() == ["pub-c", "pub-a", "pub-b"]  # newest first
    assert listed("?orderBy=name&limit=1000") == ["pub-a", "pub-b", "pub-c"]
    everything = [f["name"] for f in ok(httpx.get(f"{url}?orderBy=name&limit=1000", headers=reader.headers))]
    assert "not-public" not in everything
    at = everything.index("pub-a")
    assert [
        f["name"] for f in ok(httpx.get(f"{url}?orderBy=name&limit=2&offset={at}", headers=reader.headers))
    ] == ["pub-a", "pub-b"]
    assert len(ok(httpx.get(f"{url}?limit=1.0", headers=reader.headers))) == 1
    # A public finetune is usable and readable by others, but stays its owner's to change.
    ok(httpx.post(
        server.run_url(reader), headers=reader.headers, json={"prompt": "x", "lora": "pub-a", "max_tokens": 1}
    ))
    assert ok(
        httpx.get(server.ai_url(reader) + "/finetunes/pub-a", headers=reader.headers)
    )["name"] == "pub-a"
    fails(httpx.delete(server.ai_url(reader) + "/finetunes/pub-a", headers=reader.headers), 404, 3037)
    fails(upload(server, reader, "pub-a", "adapter_config.json", b"{}"), 404, 3037)

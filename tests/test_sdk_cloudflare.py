"""The official `cloudflare` Python SDK, pointed at a live loraserve, as a Workers AI user would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudflare
import pytest
from cloudflare import Cloudflare

from conftest import LORA_MODEL, NO_LORA_MODEL, Account, LiveServer


@pytest.fixture
def cf(server: LiveServer, account: Account) -> Iterator[Cloudflare]:
    # No retries: a retried 429 would hide the status the test is about.
    client = Cloudflare(api_token=account.token, base_url=server.base_url + "/client/v4", max_retries=0)
    yield client
    client.close()


def test_run_prompt_and_messages(cf: Cloudflare, account: Account) -> None:
    out: Any = cf.ai.run(
        LORA_MODEL, account_id=account.id, prompt="tell me a story", max_tokens=5, temperature=0
    )
    assert isinstance(out["response"], str) and out["usage"]["completion_tokens"] == 5
    raw: Any = cf.ai.run(LORA_MODEL, account_id=account.id, prompt="[INST] hi [/INST]", raw=True,
                         max_tokens=2, seed=7, top_k=5, top_p=0.9)
    assert raw["usage"]["completion_tokens"] == 2
    chat: Any = cf.ai.run(LORA_MODEL, account_id=account.id, max_tokens=3,
                          messages=[{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}])
    assert chat["usage"]["completion_tokens"] == 3


def test_run_streaming(cf: Cloudflare, account: Account) -> None:
    # The SDK's plain run() cannot unwrap an event stream (not even Cloudflare's); the raw-response
    # face is how SDK users stream, and it must see Workers AI's exact events.
    with cf.ai.with_streaming_response.run(
        LORA_MODEL, account_id=account.id, prompt="tell me a story", max_tokens=6, stream=True, temperature=0
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 6
    text = "".join(e["response"] for e in events)
    whole: Any = cf.ai.run(
        LORA_MODEL, account_id=account.id, prompt="tell me a story", max_tokens=6, temperature=0
    )
    assert text == whole["response"]


def test_errors_surface_as_sdk_exceptions(cf: Cloudflare, server: LiveServer, account: Account) -> None:
    with pytest.raises(cloudflare.BadRequestError) as bad:
        cf.ai.run("@cf/nope/nothing", account_id=account.id, prompt="x")
    assert bad.value.status_code == 400
    assert bad.value.body["errors"][0]["code"] == 5007  # type: ignore[index]
    with pytest.raises(cloudflare.NotFoundError):
        cf.ai.run(LORA_MODEL, account_id=account.id, prompt="x", lora="nope")
    with pytest.raises(cloudflare.APIStatusError) as no_lora:
        cf.ai.run(NO_LORA_MODEL, account_id=account.id, prompt="x", lora="nope")
    assert no_lora.value.status_code == 405
    stranger = Cloudflare(api_token="wrong", base_url=server.base_url + "/client/v4", max_retries=0)
    with pytest.raises(cloudflare.AuthenticationError):
        stranger.ai.finetunes.list(account_id=account.id)
    stranger.close()


def test_finetunes_create_upload_list_and_run(cf: Cloudflare, account: Account, peft_adapter: Any) -> None:
    folder: Path = peft_adapter()
    created = cf.ai.finetunes.create(
        account_id=account.id, model=LORA_MODEL, name="sdk-ft", description="from the SDK"
    )
    assert created.name == "sdk-ft" and created.model == LORA_MODEL and created.public is False
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        asset = cf.ai.finetunes.assets.create(
            created.id, account_id=account.id, file=(folder / name).read_bytes(), file_name=name
        )
        assert asset.success is True
    listed: Any = cf.ai.finetunes.list(account_id=account.id)
    assert [f.id for f in listed] == [created.id]
    assert listed[0].description == "from the SDK"
    out: Any = cf.ai.run(LORA_MODEL, account_id=account.id, prompt="hi", lora="sdk-ft", max_tokens=2)
    assert out["usage"]["completion_tokens"] == 2


def test_public_finetunes_list(cf: Cloudflare, server: LiveServer, account: Account) -> None:
    cf.ai.finetunes.create(account_id=account.id, model=LORA_MODEL, name="sdk-public", public=True)
    page = cf.ai.finetunes.public.list(account_id=account.id, limit=1000, offset=0, order_by="name")
    assert "sdk-public" in [f.name for f in page.result]
    assert all(f.public for f in page.result)

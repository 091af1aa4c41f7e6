"""loraserve.client against a live server: run (whole and streamed), finetunes, errors; sync and async."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraserve.client import APIError, AsyncClient, AsyncRunStream, Client, RunStream

from conftest import LORA_MODEL, Account, LiveServer


@pytest.fixture
def client(server: LiveServer, account: Account) -> Any:
    with Client(account.id, account.token, server.base_url) as c:
        yield c


def test_run_returns_the_result(client: Client) -> None:
    out = client.run(LORA_MODEL, {"prompt": "tell me a story", "max_tokens": 4})
    assert isinstance(out, dict)
    assert set(out) == {"response", "usage"} and out["usage"]["completion_tokens"] == 4


def test_run_streams_text_deltas_then_usage(client: Client) -> None:
    inputs = {"prompt": "tell me a story", "max_tokens": 10, "temperature": 0}
    deltas = client.run(LORA_MODEL, {**inputs, "stream": True})
    assert isinstance(deltas, RunStream)
    assert deltas.usage is None
    parts = list(deltas)
    assert len(parts) > 1 and all(isinstance(p, str) and p for p in parts)
    assert deltas.usage is not None and deltas.usage["completion_tokens"] == 10
    whole = client.run(LORA_MODEL, inputs)
    assert isinstance(whole, dict) and "".join(parts) == whole["response"]


def test_base_url_may_be_the_workers_ai_style_one(server: LiveServer, account: Account) -> None:
    with Client(account.id, account.token, server.base_url + "/client/v4/") as c:
        assert c.list_finetunes() == []


def test_errors_raise_api_error(client: Client, server: LiveServer, account: Account) -> None:
    with pytest.raises(APIError) as bad:
        client.run(LORA_MODEL, {"prompt": "x", "max_tokens": 0})
    assert (bad.value.status, bad.value.code) == (400, 5006)
    assert "max_tokens" in bad.value.message
    with pytest.raises(APIError) as missing:
        client.run(LORA_MODEL, {"prompt": "x", "lora": "nope", "stream": True})
    assert (missing.value.status, missing.value.code) == (404, 3037)
    with Client(account.id, "wrong", server.base_url) as stranger, pytest.raises(APIError) as denied:
        stranger.list_finetunes()
    assert (denied.value.status, denied.value.code, denied.value.message) == (
        401, 10000, "Authentication error"
    )


def test_finetune_management(client: Client, peft_adapter: Any, tmp_path: Path) -> None:
    created = client.create_finetune(LORA_MODEL, "client-ft", peft_adapter(), description="d")
    assert created["name"] == "client-ft" and created["description"] == "d"
    assert [f["id"] for f in client.list_finetunes()] == [created["id"]]
    assert client.get_finetune("client-ft")["id"] == created["id"]
    out = client.run(LORA_MODEL, {"prompt": "x", "lora": created["id"], "max_tokens": 2})
    assert isinstance(out, dict) and out["usage"]["completion_tokens"] == 2
    assert client.delete_finetune("client-ft")["id"] == created["id"]
    assert client.list_finetunes() == []
    with pytest.raises(APIError) as gone:
        client.get_finetune(created["id"])
    assert gone.value.code == 3037
    # A folder without both files is refused before anything is created.
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        (tmp_path / "adapter_config.json").write_text("{}")
        client.create_finetune(LORA_MODEL, "half", tmp_path)
    assert client.list_finetunes() == []


def test_public_finetunes(client: Client) -> None:
    client.new_finetune(LORA_MODEL, "client-public", public=True)
    assert "client-public" in [f["name"] for f in client.list_public_finetunes(limit=1000, orderBy="name")]


async def test_async_client(server: LiveServer, account: Account, peft_adapter: Any) -> None:
    async with AsyncClient(account.id, account.token, server.base_url) as client:
        out = await client.run(LORA_MODEL, {"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert isinstance(out, dict) and out["usage"]["completion_tokens"] == 3
        deltas = await client.run(
            LORA_MODEL, {"prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}
        )
        assert isinstance(deltas, AsyncRunStream)
        assert "".join([d async for d in deltas]) == out["response"]
        # The same counts; the second request found the first's prompt in the prefix cache.
        assert deltas.usage is not None
        cached = deltas.usage["prompt_tokens_details"]
        assert deltas.usage == {**out["usage"], "prompt_tokens_details": cached}
        created = await client.create_finetune(LORA_MODEL, "async-ft", peft_adapter())
        assert [f["name"] for f in await client.list_finetunes()] == ["async-ft"]
        assert (await client.get_finetune(created["id"]))["name"] == "async-ft"
        assert "async-ft" not in [f["name"] for f in await client.list_public_finetunes()]
        await client.delete_finetune("async-ft")
        with pytest.raises(APIError) as bad:
            await client.run("@cf/nope/x", {"prompt": "x"})
        assert bad.value.code == 5007
        with pytest.raises(APIError):
            await client.stream(LORA_MODEL, {"prompt": "x", "top_k": 0})


class _CutStreamServer:
    """A loopback socket that answers one /run with the start of a real-looking SSE stream, then closes
    the connection cleanly, as a server process that dies between two events would appear to a client."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(2):  # one sync client, one async client
            conn, _ = self.sock.accept()
            with conn:
                conn.recv(65536)
                body = b'data: {"response":"Once","p":"ab"}\n\ndata: {"response":" upon","p":"abc"}\n\n'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                    + body
                )

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()


async def test_a_stream_cut_before_done_raises_stream_interrupted() -> None:
    from loraserve.client import StreamInterrupted

    cut = _CutStreamServer()
    try:
        got: list[str] = []
        with Client("acct", "token", cut.base_url) as c, pytest.raises(StreamInterrupted) as info:
            got.extend(c.stream(LORA_MODEL, {"prompt": "x"}))
        assert got == ["Once", " upon"] and isinstance(info.value, APIError)
        assert "before its [DONE]" in info.value.message
        async with AsyncClient("acct", "token", cut.base_url) as ac:
            stream = await ac.stream(LORA_MODEL, {"prompt": "x"})
            with pytest.raises(StreamInterrupted):
                async for _text in stream:
                    pass
    finally:
        cut.close()

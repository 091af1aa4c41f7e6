"""Streamed /run: the exact SSE bytes, errors before and after the 200, and that a client going away
stops its generation at once (KV blocks freed), over real sockets."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from loraserve.api.sse import PADDING_ALPHABET

from conftest import LORA_MODEL, RUN_TIMEOUT_S, Account, LiveServer

LONG = {"prompt": "hi", "raw": True, "max_tokens": 2000, "temperature": 0}


def stream_bytes(server: LiveServer, account: Account, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", server.run_url(account), headers=account.headers, json={**body, "stream": True},
                      timeout=60) as response:
        return response, response.read()


def split_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


def parse(event: bytes) -> Any:
    assert event.startswith(b"data: ")
    assert b"\n" not in event
    return json.loads(event[len(b"data: "):].decode("utf-8", errors="strict"))


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def idle(backend: Any) -> bool:
    stats: dict[str, float] = backend.stats()
    return stats["running"] == 0 and stats["queue_depth"] == 0 and stats["kv_blocks_used"] == 0


def open_raw(
    server: LiveServer, account: Account, body: dict[str, Any], model: str = LORA_MODEL
) -> socket.socket:
    """A request on a bare socket, so a test can hang up mid-answer exactly when it wants."""
    url = urlsplit(server.run_url(account, model))
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {account.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


def test_stream_bytes_are_exactly_the_workers_ai_format(server: LiveServer, account: Account) -> None:
    response, raw = stream_bytes(
        server, account, {"prompt": "tell me a story", "max_tokens": 24, "temperature": 0}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = split_events(raw)
    assert events[-1] == b"data: [DONE]"
    usage = parse(events[-2])
    assert usage == {"response": "", "usage": usage["usage"]}
    assert set(usage["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                   "prompt_tokens_details"}
    assert usage["usage"]["completion_tokens"] == 24
    texts = []
    for event in events[:-2]:
        data = parse(event)
        assert set(data) == {"response", "p"}
        assert data["response"] and isinstance(data["response"], str)
        assert data["p"] and (PADDING_ALPHABET * 2).startswith(data["p"])
        texts.append(data["response"])
    assert len(texts) > 1
    assert len({len(parse(e)["p"]) for e in events[:-2]}) > 1  # random lengths, not a constant

    whole = httpx.post(
        server.run_url(account), headers=account.headers,
        json={"prompt": "tell me a story", "max_tokens": 24, "temperature": 0},
    ).json()["result"]
    assert "".join(texts) == whole["response"]
    # The same counts, but for the prompt tokens the second request found in the prefix cache.
    cached = whole["usage"]["prompt_tokens_details"]
    assert {**usage["usage"], "prompt_tokens_details": cached} == whole["usage"]


def test_errors_before_the_first_event_are_http_errors(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    window = tiny_backend.info.context_window
    cases = [
        ({"prompt": "x", "max_tokens": window}, 413, 5021),
        ({"prompt": "x", "lora": "missing"}, 404, 3037),
        ({"prompt": "x", "top_k": 99}, 400, 5006),
    ]
    for body, status, code in cases:
        response, raw = stream_bytes(server, account, body)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert json.loads(raw)["errors"][0]["code"] == code


def test_disconnect_mid_stream_aborts_the_generation(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    assert wait_until(lambda: idle(tiny_backend))
    sock = open_raw(server, account, {**LONG, "stream": True})
    head = read_until(sock, b"data: {")
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    assert wait_until(lambda: tiny_backend.stats()["running"] == 1)
    sock.close()
    # A whole run of LONG takes seconds; an abort frees everything within milliseconds.
    assert wait_until(lambda: idle(tiny_backend), timeout_s=0.5), tiny_backend.stats()


def test_disconnect_while_waiting_for_a_whole_answer_aborts(
    server: LiveServer, account: Account, tiny_backend: Any
) -> None:
    assert wait_until(lambda: idle(tiny_backend))
    sock = open_raw(server, account, LONG)
    assert wait_until(lambda: tiny_backend.stats()["running"] == 1)
    sock.close()
    assert wait_until(lambda: idle(tiny_backend), timeout_s=0.5), tiny_backend.stats()


def test_timeout_mid_stream_ends_with_an_error_event(strict_server: LiveServer, tiny_backend: Any) -> None:
    account = strict_server.new_account()
    started = time.monotonic()
    response, raw = stream_bytes(strict_server, account, LONG)
    assert response.status_code == 200
    events = split_events(raw)
    assert parse(events[0])["response"]
    last = parse(events[-1])
    assert last["success"] is False and last["errors"][0]["code"] == 3007
    assert b"[DONE]" not in raw
    assert time.monotonic() - started < RUN_TIMEOUT_S + 1.0
    assert wait_until(lambda: idle(tiny_backend), timeout_s=2.0)


def test_timeout_of_a_whole_answer_is_408(strict_server: LiveServer, tiny_backend: Any) -> None:
    account = strict_server.new_account()
    response = httpx.post(strict_server.run_url(account), headers=account.headers, json=LONG, timeout=30)
    assert response.status_code == 408
    assert response.json()["errors"] == [{"code": 3007, "message": "Request timeout"}]
    assert wait_until(lambda: idle(tiny_backend), timeout_s=2.0)

"""Contract section 4 over real HTTP: authentication, routing, bodies, limits, capacity, and the
envelope for everything, FastAPI's own errors and our bugs included."""

from __future__ import annotations

import json
import logging
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI

from loraserve.api import BackgroundServer, create_app

from conftest import LORA_MODEL, ONE_SLOT_MODEL, Account, LiveServer
from test_api_stream import idle, open_raw, read_until, wait_until

ENVELOPE_KEYS = {"result", "success", "errors", "messages"}


def envelope(response: httpx.Response, status: int, code: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == ENVELOPE_KEYS and body["result"] is None and body["success"] is False
    assert [e["code"] for e in body["errors"]] == [code]
    message: str = body["errors"][0]["message"]
    return message


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"},
     {"Authorization": "Bearer not-a-token"}],
)
def test_missing_or_invalid_token(server: LiveServer, account: Account, headers: dict[str, str]) -> None:
    for method, path in [("POST", f"/run/{LORA_MODEL}"), ("GET", "/finetunes"), ("POST", "/finetunes"),
                         ("GET", "/finetunes/public"), ("GET", "/finetunes/x"), ("DELETE", "/finetunes/x"),
                         ("POST", "/finetunes/x/finetune-assets")]:
        response = httpx.request(method, server.ai_url(account) + path, headers=headers, json={"prompt": "x"})
        assert envelope(response, 401, 10000) == "Authentication error"


def test_another_accounts_token_is_refused(server: LiveServer, account: Account) -> None:
    other = server.new_account()
    response = httpx.get(server.ai_url(account) + "/finetunes", headers=other.headers)
    envelope(response, 401, 10000)


def test_revoked_token_is_refused(server: LiveServer, account: Account) -> None:
    url = server.ai_url(account) + "/finetunes"
    assert httpx.get(url, headers=account.headers).status_code == 200
    assert server.registry.revoke_token(account.token)
    envelope(httpx.get(url, headers=account.headers), 401, 10000)


def test_unknown_account(server: LiveServer, account: Account) -> None:
    response = httpx.get(server.ai_url("no-such-account") + "/finetunes", headers=account.headers)
    message = envelope(response, 404, 7003)
    assert message == (
        "Could not route to /client/v4/accounts/no-such-account/ai/finetunes, perhaps your object identifier "
        "is invalid?"
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/client/v4/accounts/{a}/ai/nothing"), ("GET", "/nothing"),
     ("POST", "/"),  # GET / is the HTML index page
     ("GET", "/client/v4/accounts/{a}/ai/run/" + LORA_MODEL), ("PUT", "/client/v4/accounts/{a}/ai/finetunes"),
     ("PATCH", "/client/v4/accounts/{a}/ai/finetunes/x"), ("GET", "/client/v4/accounts/{a}/ai/finetunes/")],
)
def test_unknown_routes_and_methods(server: LiveServer, account: Account, method: str, path: str) -> None:
    response = httpx.request(method, server.base_url + path.format(a=account.id), headers=account.headers)
    assert "Could not route to" in envelope(response, 404, 7003)


@pytest.mark.parametrize(("content", "code"), [(b"", 3003), (b"   ", 3003), (b"{", 3003), (b"\xff\xfe", 3003),
                                               (b"[1, 2]", 5006), (b'"prompt"', 5006)])
def test_missing_or_broken_body(server: LiveServer, account: Account, content: bytes, code: int) -> None:
    for url in (server.run_url(account), server.ai_url(account) + "/finetunes"):
        envelope(httpx.post(url, headers=account.headers, content=content), 400, code)


def test_finetune_create_schema_errors_name_the_field(server: LiveServer, account: Account) -> None:
    url = server.ai_url(account) + "/finetunes"
    for body, field in [({"name": "x"}, "model"), ({"model": LORA_MODEL}, "name"),
                        ({"model": LORA_MODEL, "name": "x", "public": "perhaps"}, "public")]:
        assert field in envelope(httpx.post(url, headers=account.headers, json=body), 400, 5006)


def test_public_list_query_errors_name_the_parameter(server: LiveServer, account: Account) -> None:
    url = server.ai_url(account) + "/finetunes/public"
    for query, name in [("limit=0", "limit"), ("limit=abc", "limit"), ("offset=-1", "offset"),
                        ("orderBy=size", "orderBy"), ("limit=2.5", "limit")]:
        assert name in envelope(httpx.get(f"{url}?{query}", headers=account.headers), 400, 5006)


def test_body_over_the_limit_declared(strict_server: LiveServer) -> None:
    account = strict_server.new_account()
    body = json.dumps({"prompt": "x" * 3000}).encode()
    response = httpx.post(strict_server.run_url(account), headers=account.headers, content=body)
    assert envelope(response, 413, 3006) == "Request is too large"


def test_body_over_the_limit_streamed_is_refused_before_it_ends(strict_server: LiveServer) -> None:
    """Chunked, no Content-Length, and never finished: the 413 must come while the body is still
    arriving, which it only can if the limit is checked as the chunks come in."""
    account = strict_server.new_account()
    url = urlsplit(strict_server.run_url(account))
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(
            f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {account.token}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for _ in range(3):  # 3 KB of a body that never ends, against a 2 KiB limit
            sock.sendall(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
        response = read_until(sock, b'"code":3006')
    assert response.startswith(b"HTTP/1.1 413 ")


def test_upload_over_the_limit(strict_server: LiveServer) -> None:
    account = strict_server.new_account()
    url = strict_server.ai_url(account) + "/finetunes"
    finetune = httpx.post(
        url, headers=account.headers, json={"model": LORA_MODEL, "name": "big"}
    ).json()["result"]
    response = httpx.post(f"{url}/{finetune['id']}/finetune-assets", headers=account.headers,
                          data={"file_name": "adapter_model.safetensors"},
                          files={"file": ("blob", b"\0" * 200_000)})
    assert "exceeds 4096 bytes" in envelope(response, 400, 3039)


def test_chunked_upload_over_the_limit_is_refused_before_it_ends(strict_server: LiveServer) -> None:
    account = strict_server.new_account()
    url = strict_server.ai_url(account) + "/finetunes"
    finetune = httpx.post(
        url, headers=account.headers, json={"model": LORA_MODEL, "name": "big"}
    ).json()["result"]
    target = urlsplit(f"{url}/{finetune['id']}/finetune-assets")
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file_name"\r\n\r\nadapter_model.safetensors\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="blob"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    with socket.create_connection((target.hostname, target.port), timeout=5) as sock:
        sock.sendall(
            f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
            f"Authorization: Bearer {account.token}\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")
        for _ in range(80):  # 80 KB of a file that never ends, against 4 KiB + the multipart allowance
            sock.sendall(b"3e8\r\n" + b"\0" * 1000 + b"\r\n")
        response = read_until(sock, b'"code":3039')
    assert response.startswith(b"HTTP/1.1 400 ")


def test_rate_limit_per_account(strict_server: LiveServer) -> None:
    account, other = strict_server.new_account(), strict_server.new_account()
    body = {"prompt": "x", "max_tokens": 1}
    for _ in range(3):
        assert httpx.post(
            strict_server.run_url(account), headers=account.headers, json=body
        ).status_code == 200
    refusals = _refusals_timed(strict_server)
    response = httpx.post(strict_server.run_url(account), headers=account.headers, json=body)
    assert "too many requests" in envelope(response, 429, 3036)
    assert httpx.post(strict_server.run_url(other), headers=other.headers, json=body).status_code == 200
    # The server times its refusals (loadtest reads them): one more, and only the 429 counted.
    assert _refusals_timed(strict_server) == refusals + 1


def _refusals_timed(server: LiveServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    line = next(line for line in text.splitlines()
                if line.startswith("loraserve_http_refusal_duration_seconds_count"))
    return float(line.split()[-1])


def test_capacity_exceeded_when_the_queue_is_full(one_slot_server: LiveServer) -> None:
    """One request runs, one waits; the third is refused with 3040 at once."""
    engine = one_slot_server.backends[ONE_SLOT_MODEL]
    account = one_slot_server.new_account()
    body = {"prompt": "hi", "raw": True, "max_tokens": 2000, "temperature": 0, "stream": True}
    running = open_raw(one_slot_server, account, body, ONE_SLOT_MODEL)
    waiting: socket.socket | None = None
    try:
        read_until(running, b"data: {")
        waiting = open_raw(one_slot_server, account, body, ONE_SLOT_MODEL)
        assert wait_until(lambda: engine.stats()["queue_depth"] == 1)
        response = httpx.post(one_slot_server.run_url(account, ONE_SLOT_MODEL), headers=account.headers,
                              json={"prompt": "x", "max_tokens": 1})
        assert envelope(response, 429, 3040) == "Capacity temporarily exceeded, please try again."
        # Refused before the template, tokenizer and finetune lookup run: an unknown lora is not looked up.
        assert engine.is_full()
        early = httpx.post(one_slot_server.run_url(account, ONE_SLOT_MODEL), headers=account.headers,
                           json={"prompt": "x", "max_tokens": 1, "lora": "no-such-finetune"})
        envelope(early, 429, 3040)
    finally:
        running.close()
        if waiting is not None:
            waiting.close()
    assert wait_until(lambda: idle(engine), timeout_s=2.0)


def test_a_bug_is_an_envelope_and_a_log_line_without_the_token(
    server: LiveServer, account: Account, tiny_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app: FastAPI = create_app(server.registry, {LORA_MODEL: tiny_backend})

    def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/client/v4/accounts/{account_id}/ai/broken", broken, methods=["GET"])
    with caplog.at_level(logging.ERROR, logger="loraserve.api"), BackgroundServer(app) as live:
        response = httpx.get(
            f"{live.base_url}/client/v4/accounts/{account.id}/ai/broken", headers=account.headers
        )
        assert envelope(response, 500, 3043) == "Internal server error"
        # The server is still up.
        assert httpx.get(f"{live.base_url}/healthz").status_code == 200
    assert any("unhandled error" in r.message and r.exc_info for r in caplog.records)
    assert account.token not in caplog.text
    assert threading.active_count() >= 1


def test_a_client_gone_before_its_body_is_read_is_no_server_error(
    server: LiveServer, account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    """Under overload a client may hang up before the server reads its body: a 499 in the metrics, not a
    3043 with a traceback."""

    def run_statuses() -> dict[str, float]:
        statuses: dict[str, float] = {}
        for line in httpx.get(f"{server.base_url}/metrics").text.splitlines():
            if line.startswith("loraserve_http_requests_total{") and 'route="/run/{model:path}"' in line:
                status = line.split('status="')[1].split('"')[0]
                statuses[status] = statuses.get(status, 0) + float(line.rsplit(" ", 1)[1])
        return statuses

    before = run_statuses()
    url = urlsplit(server.run_url(account))
    with caplog.at_level(logging.ERROR, logger="loraserve.api"):
        sock = socket.create_connection((url.hostname, url.port), timeout=10)
        sock.sendall(f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     f"Authorization: Bearer {account.token}\r\n"
                     f"Content-Length: 1000\r\n\r\n{{\"prompt\": ".encode())
        sock.close()  # 990 bytes short
        assert wait_until(lambda: run_statuses().get("499", 0) > before.get("499", 0))
    after = run_statuses()
    assert {k: v for k, v in after.items() if k.startswith("5")} \
        == {k: v for k, v in before.items() if k.startswith("5")}
    assert not [r for r in caplog.records if "unhandled error" in r.message]

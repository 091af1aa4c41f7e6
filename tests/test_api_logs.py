"""Bearer tokens never reach the logs: `loraserve serve --log-level debug` in a real subprocess sees
every kind of request (good, bad, foreign, revoked, streamed, uploads, OpenAI routes), and neither a
token nor its stored hash appears anywhere in what the server printed."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import LORA_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_health(proc: subprocess.Popen[Any], base: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server did not come up"
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)


def _token(data_dir: Path, account: str) -> str:
    done = subprocess.run([sys.executable, "-m", "loraserve", "token", "create", "--account", account,
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1]


def _revoke(data_dir: Path, token: str) -> None:
    subprocess.run([sys.executable, "-m", "loraserve", "token", "revoke", token, "--data-dir", str(data_dir)],
                   capture_output=True, text=True, timeout=60, check=True)


def _traffic(base: str, alice: str, bob: str, revoked: str, folder: Path) -> None:
    ai = f"{base}/client/v4/accounts/alice/ai"
    h = {"Authorization": f"Bearer {alice}"}
    run = f"{ai}/run/{LORA_MODEL}"
    assert httpx.post(run, headers=h, json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    with httpx.stream("POST", run, headers=h, json={"prompt": "hi", "max_tokens": 2, "stream": True}) as s:
        assert s.status_code == 200 and s.read()
    ft = httpx.post(f"{ai}/finetunes", headers=h, json={"model": LORA_MODEL, "name": "mine"}).json()["result"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        up = httpx.post(f"{ai}/finetunes/{ft['id']}/finetune-assets", headers=h, data={"file_name": name},
                        files={"file": ("blob", (folder / name).read_bytes())})
        assert up.status_code == 200, up.text
    assert httpx.post(run, headers=h, json={"prompt": "hi", "lora": "mine", "max_tokens": 2}).status_code == 200
    refused = [
        httpx.post(f"{ai}/finetunes/{ft['id']}/finetune-assets", headers=h,
                   data={"file_name": "adapter_model.safetensors"}, files={"file": ("blob", b"\x08junk")}),
        httpx.post(run, headers=h, content=b"{not json"),
        httpx.post(run, headers=h, json={"prompt": "hi", "max_tokens": 10**9}),
        httpx.post(run, headers={"Authorization": f"Bearer {bob}"}, json={"prompt": "hi"}),
        httpx.post(run, headers={"Authorization": f"Bearer {revoked}"}, json={"prompt": "hi"}),
        httpx.post(run, headers={"Authorization": f"Basic {alice}"}, json={"prompt": "hi"}),
        httpx.post(f"{ai}/v1/chat/completions", headers={"Authorization": f"Bearer {revoked}"},
                   json={"model": LORA_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        httpx.get(f"{base}/client/v4/accounts/alice/ai/nowhere", headers=h),
    ]
    assert all(400 <= r.status_code < 500 for r in refused), [r.text for r in refused]
    chat = httpx.post(f"{ai}/v1/chat/completions", headers=h, json={
        "model": f"{LORA_MODEL}:mine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert httpx.delete(f"{ai}/finetunes/mine", headers=h).status_code == 200


def test_tokens_never_appear_in_the_server_logs(tmp_path: Path, peft_adapter: Any) -> None:
    alice, bob, revoked = _token(tmp_path, "alice"), _token(tmp_path, "bob"), _token(tmp_path, "alice")
    _revoke(tmp_path, revoked)
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loraserve", "serve", "--port", str(port), "--data-dir", str(tmp_path),
             "--model", f"{LORA_MODEL}=random:tiny", "--rate-limit", "0", "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for_health(proc, base)
            _traffic(base, alice, bob, revoked, peft_adapter())
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    logs = log_path.read_text()
    # The logs are real and detailed: every request is there, so a token in them would be seen.
    assert logs.count('"POST /client/v4/accounts/alice/ai/') >= 14 and " 401 " in logs
    for token in (alice, bob, revoked):
        assert token not in logs
        assert hashlib.sha256(token.encode()).hexdigest() not in logs

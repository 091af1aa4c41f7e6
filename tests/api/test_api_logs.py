"""Bearer tokens never reach the logs: `loraserve serve --log-level debug` in a real subprocess sees
every kind of request (good, bad, foreign, revoked, streamed, uploads, OpenAI routes), and neither a
token nor its stored hash appears anywhere in what the server printed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from conftest import LORA_MODEL
from serve_helpers import ServeProcess, create_token


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
    assert httpx.post(
        run, headers=h, json={"prompt": "hi", "lora": "mine", "max_tokens": 2}
    ).status_code == 200
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
    alice, bob, revoked = (create_token(tmp_path, account) for account in ("alice", "bob", "alice"))
    _revoke(tmp_path, revoked)
    # The last --log-level wins: debug, the most an operator can ask for.
    with ServeProcess(tmp_path, tmp_path / "server.log", [f"{LORA_MODEL}=random:tiny"],
                      extra_args=("--rate-limit", "0", "--log-level", "debug"),
                      env={"PYTHONUNBUFFERED": "1"}) as server:
        server.start()
        _traffic(server.base_url, alice, bob, revoked, peft_adapter())
        assert server.stop() == 0
        logs = server.log()
    # The logs are real and detailed: every request is there, so a token in them would be seen.
    assert logs.count('"POST /client/v4/accounts/alice/ai/') >= 14 and " 401 " in logs
    for token in (alice, bob, revoked):
        assert token not in logs
        assert hashlib.sha256(token.encode()).hexdigest() not in logs

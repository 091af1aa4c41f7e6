"""The real `wrangler` CLI (tests/wrangler, installed by scripts/install from the npm registry) against
a live server, as a Workers AI user runs it: `CLOUDFLARE_API_BASE_URL` pointed at us, nothing else
changed. `wrangler ai finetune create` then `list`, the finetune then used by /run, and `wrangler whoami`
(which wrangler also runs by itself after an authentication error)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LORA_MODEL, Account, LiveServer

WRANGLER = Path(__file__).parent / "wrangler" / "node_modules" / ".bin" / "wrangler"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None, reason="Node.js is not installed on this machine"
)


def wrangler(
    server: LiveServer, account: Account, *args: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    assert WRANGLER.exists(), (
        "wrangler is not installed: run scripts/install (it runs npm ci in tests/wrangler)"
    )
    env = {
        **os.environ,
        "CLOUDFLARE_API_BASE_URL": f"{server.base_url}/client/v4",
        "CLOUDFLARE_ACCOUNT_ID": account.id,
        "CLOUDFLARE_API_TOKEN": account.token,
        "WRANGLER_SEND_METRICS": "false",
        "CI": "true",  # no prompts
        # hiding the banner also skips wrangler's update check (a call to the npm registry)
        "WRANGLER_HIDE_BANNER": "true",
        "NO_COLOR": "1",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),  # wrangler's logs and state, not the user's
        "HOME": str(tmp_path),
    }
    return subprocess.run([str(WRANGLER), *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


def test_finetune_create_and_list_then_run(server: LiveServer, peft_adapter: Any, tmp_path: Path) -> None:
    account = server.new_account("wrangler")
    folder = peft_adapter()
    created = wrangler(server, account, "ai", "finetune", "create", LORA_MODEL, "from-wrangler", str(folder),
                       tmp_path=tmp_path)
    assert created.returncode == 0, created.stdout + created.stderr
    assert 'finetune "from-wrangler" is ready to use' in created.stdout
    listed = wrangler(server, account, "ai", "finetune", "list", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    finetunes = httpx.get(f"{server.ai_url(account)}/finetunes", headers=account.headers).json()["result"]
    assert [f["name"] for f in finetunes] == ["from-wrangler"]
    assert finetunes[0]["id"] in listed.stdout and "from-wrangler" in listed.stdout
    run = httpx.post(server.run_url(account), headers=account.headers,
                     json={"prompt": "hello", "lora": "from-wrangler", "max_tokens": 3})
    assert run.status_code == 200 and run.json()["result"]["usage"]["completion_tokens"] == 3
    # The same name again is refused, and wrangler shows our message (it exits 0 all the same).
    again = wrangler(server, account, "ai", "finetune", "create", LORA_MODEL, "from-wrangler", str(folder),
                     tmp_path=tmp_path)
    assert "Finetune couldn't be created" in again.stderr
    assert "a finetune named 'from-wrangler' already exists in this account [code: 5006]" in again.stderr


def test_whoami_names_the_tokens_account(server: LiveServer, tmp_path: Path) -> None:
    account = server.new_account("who")
    who = wrangler(server, account, "whoami", tmp_path=tmp_path)
    assert who.returncode == 0, who.stdout + who.stderr
    assert f"logged in with an Account API Token, associated with the account {account.id}" in who.stdout

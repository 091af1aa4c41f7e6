"""The Playground in a real headless Chromium (Debian's, driven by Playwright) against a live server:
credentials, uploading a finetune, picking it, a streamed run, the generated code (which is run
too), and API errors shown as readable messages. Saves artifacts/playground.png."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import LORA_MODEL, NO_LORA_MODEL, Account, LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SYSTEM = "You are a pirate. Answer in one sentence."
PROMPT = "Tell me about the sea."



def test_pages_are_served_from_the_package(server: LiveServer) -> None:
    index = httpx.get(server.base_url + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'href="/playground"' in index.text and LORA_MODEL in index.text
    page = httpx.get(server.base_url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{server.base_url}/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert f"/playground/{name}" in page.text
    missing = httpx.get(server.base_url + "/playground/secrets.py")
    assert missing.status_code == 404 and missing.json()["errors"][0]["code"] == 7003


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing and could not be installed: scripts/install installs Debian's "
                    f"chromium (as root) for the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None,
    )
    yield page
    context.close()
    # API errors are shown on the page, never thrown; a CSP violation or a JS bug would show up here.
    assert [p for p in problems if "Failed to load resource" not in p] == []


def sign_in(page: Any, account: Account, token: str | None = None) -> None:
    page.get_by_label("Account ID", exact=True).fill(account.id)
    page.get_by_label("API token", exact=True).fill(token or account.token)
    page.get_by_role("button", name="Save", exact=True).click()


def run_snippet(code: str, account: Account) -> str:
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": account.token, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_playground_streams_a_finetunes_answer(page: Any, server: LiveServer, peft_adapter: Any) -> None:
    account = server.new_account("playground")
    folder: Path = peft_adapter()
    page.goto(server.base_url + "/")
    page.get_by_role("link", name="Playground").click()
    page.wait_for_url("**/playground")
    sign_in(page, account)
    status = page.locator("#credentials-status")
    status.filter(has_text="Connected").wait_for()
    assert sorted(page.get_by_label("Model", exact=True).locator("option").all_inner_texts()) == sorted(
        [LORA_MODEL, NO_LORA_MODEL])

    # Upload a finetune (create + its two files) from the page.
    page.get_by_label("Model", exact=True).select_option(LORA_MODEL)
    page.get_by_label("Finetune name", exact=True).fill("pg-pirate")
    page.get_by_label("Adapter config (adapter_config.json)").set_input_files(folder / "adapter_config.json")
    page.get_by_label("Adapter weights (adapter_model.safetensors)").set_input_files(
        folder / "adapter_model.safetensors")
    page.get_by_role("button", name="Upload", exact=True).click()
    page.locator("#upload-status").filter(has_text="Uploaded pg-pirate").wait_for()

    page.get_by_label("LoRA", exact=True).select_option("pg-pirate")
    page.get_by_label("System", exact=True).fill(SYSTEM)
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Max tokens", exact=True).fill("48")
    page.get_by_label("Temperature", exact=True).fill("0")

    response = page.get_by_role("region", name="Response")
    # Count what lands in the region as it arrives: streamed text comes in many pieces.
    page.evaluate("""() => {
        window.__pieces = 0;
        const region = document.querySelector('[role="region"][aria-label="Response"]');
        new MutationObserver((records) => { window.__pieces += records.length; })
            .observe(region, {childList: true, characterData: true, subtree: true});
    }""")
    page.get_by_role("button", name="Run", exact=True).click()
    page.locator("#run-status").filter(has_text="Done").wait_for()

    body: dict[str, Any] = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        "max_tokens": 48, "temperature": 0, "lora": "pg-pirate",
    }
    expected = httpx.post(
        server.run_url(account), headers=account.headers, json=body, timeout=60
    ).json()["result"]
    assert response.text_content() == expected["response"] != ""
    assert page.evaluate("window.__pieces") > 1
    assert response.get_attribute("aria-live") == "polite"
    assert "48 completion tokens" in page.locator("#usage").inner_text()
    assert page.get_by_role("alert").is_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    # The code shown is the same request: run it, it prints the same answer.
    def code(name: str) -> str:
        text: str = page.locator(f"#code-{name} code").text_content()
        return text

    curl = code("curl")
    assert f"/client/v4/accounts/{account.id}/ai/run/{LORA_MODEL}" in curl and '"lora": "pg-pirate"' in curl
    assert account.token not in curl + code("python") + code("cloudflare") + code("openai")
    page.get_by_role("tab", name="Python (loraserve)").click()
    assert page.locator("#code-python").is_visible() and page.locator("#code-curl").is_hidden()
    for name in ("python", "cloudflare", "openai"):
        assert run_snippet(code(name), account).startswith(expected["response"] + "\n"), name
    if shutil.which("curl"):
        env = {**os.environ, "CLOUDFLARE_API_TOKEN": account.token}
        out = subprocess.run(
            ["bash", "-c", curl], env=env, capture_output=True, timeout=60, check=True
        ).stdout
        assert out.rstrip().endswith(b"data: [DONE]") and b'"completion_tokens":48' in out


def test_playground_shows_api_errors_and_remembers_the_account(page: Any, server: LiveServer) -> None:
    account = server.new_account("playground")
    page.goto(server.base_url + "/playground")
    alert = page.get_by_role("alert")

    sign_in(page, account, token="not-the-token")
    alert.wait_for()
    assert "Error 10000" in alert.inner_text() and "Authentication error" in alert.inner_text()
    assert "HTTP 401" in alert.inner_text()

    sign_in(page, account)
    page.locator("#credentials-status").filter(has_text="Connected").wait_for()
    assert alert.is_hidden()
    page.get_by_label("Prompt", exact=True).fill("hello")
    page.get_by_label("Max tokens", exact=True).fill("100000")
    page.get_by_role("button", name="Run", exact=True).click()
    alert.wait_for()
    text = alert.inner_text()
    assert "Error 5021" in text and "context window limit" in text and "HTTP 413" in text
    assert page.locator("#run-status").inner_text() == "Failed"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-error.png"))

    # A schema error names the field; a model without LoRA support disables the LoRA picker.
    page.get_by_label("Max tokens", exact=True).fill("16")
    page.get_by_label("Raw (no chat template)").check()
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("alert").filter(has_text="Error 5006").wait_for()
    assert "AiError: Bad input: prompt" in alert.inner_text()
    page.get_by_label("Model", exact=True).select_option(NO_LORA_MODEL)
    lora = page.get_by_label("LoRA", exact=True)
    page.wait_for_function("document.getElementById('lora').disabled")
    assert lora.is_disabled()

    # Entered once: a reload signs in again from localStorage.
    page.reload()
    page.locator("#credentials-status").filter(has_text="Connected").wait_for()
    assert page.get_by_label("Account ID", exact=True).input_value() == account.id
    assert page.get_by_label("Model", exact=True).input_value() == NO_LORA_MODEL

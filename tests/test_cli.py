"""The `loraserve` command: tokens on the registry, finetunes and runs against a live server, and
`serve` itself in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest
import torch
from typer.testing import CliRunner

from loraserve.cli import app
from loraserve.errors import AuthenticationError

from conftest import LORA_MODEL, Account, LiveServer
from quantize_helpers import tiny_hf_dir, write_byte_level_tokenizer
from serve_helpers import ServeProcess

runner = CliRunner()


def cli(*args: str, server: LiveServer | None = None, account: Account | None = None) -> Any:
    env = {}
    if server is not None:
        env["LORASERVE_BASE_URL"] = server.base_url
    if account is not None:
        env.update(LORASERVE_ACCOUNT_ID=account.id, LORASERVE_TOKEN=account.token)
    return runner.invoke(app, list(args), env=env)


def loraserve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loraserve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_token_create_prints_the_token_alone_on_the_last_line(server: LiveServer) -> None:
    done = loraserve("token", "create", "--account", "cli-new", "--label", "ci",
                     env={"LORASERVE_DATA_DIR": str(server.registry.data_dir)})
    assert done.returncode == 0, done.stderr
    token = done.stdout.splitlines()[-1]
    assert token.strip() == token and " " not in token and len(token) >= 20
    server.registry.authenticate("cli-new", token)
    response = httpx.get(
        f"{server.ai_url('cli-new')}/finetunes", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200


def test_token_revoke(server: LiveServer) -> None:
    data_dir = str(server.registry.data_dir)
    token = cli("token", "create", "--account", "cli-revoke", "--data-dir", data_dir).stdout.splitlines()[-1]
    assert cli("token", "revoke", token, "--data-dir", data_dir).exit_code == 0
    with pytest.raises(AuthenticationError):
        server.registry.authenticate("cli-revoke", token)
    again = cli("token", "revoke", token, "--data-dir", data_dir)
    assert again.exit_code == 1 and "no such live token" in again.stderr


def test_token_create_refuses_a_bad_account_id(tmp_path: Path) -> None:
    result = cli("token", "create", "--account", "bad id!", "--data-dir", str(tmp_path))
    assert result.exit_code == 2 and "account id" in result.stderr


def test_token_then_finetune_create_list_delete(server: LiveServer, peft_adapter: Any) -> None:
    made = cli("token", "create", "--account", "cli-ft-owner", "--data-dir", str(server.registry.data_dir))
    account = Account("cli-ft-owner", made.stdout.splitlines()[-1])
    created = cli(
        "finetune", "create", LORA_MODEL, "cli-ft", str(peft_adapter()), server=server, account=account
    )
    assert created.exit_code == 0, created.output
    finetune_id = created.stdout.splitlines()[-1]
    assert "ready to use" in created.stderr
    run = httpx.post(server.run_url(account), headers=account.headers,
                     json={"prompt": "x", "lora": "cli-ft", "max_tokens": 1})
    assert run.status_code == 200
    listed = cli("finetune", "list", "--json", server=server, account=account)
    assert [f["id"] for f in json.loads(listed.stdout)] == [finetune_id]
    piped = cli("finetune", "list", server=server, account=account)
    assert piped.stdout.splitlines() == [f"{finetune_id}\tcli-ft\t{LORA_MODEL}\t"]
    assert cli("finetune", "delete", "cli-ft", server=server, account=account).exit_code == 0
    assert json.loads(cli("finetune", "list", "--json", server=server, account=account).stdout) == []


def test_finetune_create_errors(
    server: LiveServer, account: Account, tmp_path: Path, peft_adapter: Any
) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    half = cli("finetune", "create", LORA_MODEL, "half", str(tmp_path), server=server, account=account)
    assert half.exit_code == 1 and "adapter_model.safetensors" in half.stderr
    unknown = cli(
        "finetune", "create", "@cf/nope/x", "x", str(peft_adapter()), server=server, account=account
    )
    assert unknown.exit_code == 1 and "5007" in unknown.stderr
    assert json.loads(cli("finetune", "list", "--json", server=server, account=account).stdout) == []


def test_run(server: LiveServer, account: Account) -> None:
    whole = cli("run", LORA_MODEL, "--prompt", "tell me a story", "--max-tokens", "6", "--temperature", "0",
                server=server, account=account)
    assert whole.exit_code == 0, whole.output
    streamed = cli("run", LORA_MODEL, "--prompt", "tell me a story", "--max-tokens", "6",
                   "--temperature", "0", "--stream", server=server, account=account)
    assert streamed.exit_code == 0, streamed.output
    assert whole.stdout == streamed.stdout and whole.stdout.strip()
    assert "'completion_tokens': 6" in whole.stderr
    messages = json.dumps([{"role": "user", "content": "hi"}])
    chat = cli("run", LORA_MODEL, "--messages", messages, "--max-tokens", "2", server=server, account=account)
    assert chat.exit_code == 0
    raw = cli("run", LORA_MODEL, "--prompt", "[INST] hi [/INST]", "--raw", "--max-tokens", "2",
              server=server, account=account)
    assert raw.exit_code == 0


def test_run_errors(server: LiveServer, account: Account) -> None:
    assert cli("run", LORA_MODEL, server=server, account=account).exit_code == 2
    assert cli("run", LORA_MODEL, "--messages", "{oops", server=server, account=account).exit_code == 2
    failed = cli("run", LORA_MODEL, "--prompt", "x", "--lora", "nope", server=server, account=account)
    assert failed.exit_code == 1 and "3037" in failed.stderr


def test_bench_passes_its_arguments_through() -> None:
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    assert "loraserve bench" in result.stdout


def test_serve_runs_until_interrupted(tmp_path: Path) -> None:
    metrics_token = "scrape-me-please-0123"
    with ServeProcess(tmp_path, tmp_path / "serve.log",
                      ["@cf/test/tiny-lora=random:tiny", "@cf/test/tiny=random:tiny:q8_0"],
                      extra_args=("--rate-limit", "0", "--max-rank", "16", "--no-prefix-caching"),
                      env={"LORASERVE_METRICS_TOKEN": metrics_token}) as server:
        server.start()
        health = httpx.get(f"{server.base_url}/healthz")
        assert health.json() == {"status": "ok", "models": ["@cf/test/tiny", "@cf/test/tiny-lora"]}
        assert (tmp_path / "finetunes").exists() or any(tmp_path.iterdir())
        assert httpx.get(f"{server.base_url}/metrics").status_code == 401
        scraped = httpx.get(
            f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {metrics_token}"}
        )
        assert scraped.status_code == 200 and "loraserve_kv_blocks_used" in scraped.text
        assert server.stop() == 0, server.log()
        # What each model was loaded as: quantized blocks (dtype auto keeps them) or float.
        assert "loaded @cf/test/tiny: 2 layers, gguf weights as stored" in server.log()
        assert "loaded @cf/test/tiny-lora: 2 layers, float32 weights" in server.log()


def test_serve_refuses_a_bad_device_or_dtype_before_loading(tmp_path: Path) -> None:
    base = ("serve", "--data-dir", str(tmp_path), "--model", "@cf/test/tiny=random:tiny")
    bad_device = loraserve(*base, "--device", "tpu")
    assert bad_device.returncode == 2 and "device must be cpu, cuda or cuda:N" in bad_device.stderr
    bad_dtype = loraserve(*base, "--dtype", "float64")
    assert bad_dtype.returncode == 2 and (
        "dtype must be auto, float32, bfloat16, float16 or gguf" in bad_dtype.stderr
    )
    bad_lora_dtype = loraserve(*base, "--lora-dtype", "bfloat16")
    assert bad_lora_dtype.returncode == 2 and (
        "lora_dtype must be auto, float32 or float16" in bad_lora_dtype.stderr
    )
    bad_kv_dtype = loraserve(*base, "--kv-dtype", "int8")
    assert bad_kv_dtype.returncode == 2 and "kv_dtype must be auto, float32 or float16" in bad_kv_dtype.stderr
    kv_on_gpu = loraserve(*base, "--device", "cuda", "--kv-dtype", "float16")
    assert kv_on_gpu.returncode == 2 and "kv_dtype is for the CPU" in kv_on_gpu.stderr
    if not torch.cuda.is_available():  # CI: the CPU torch wheel
        no_gpu = loraserve(*base, "--device", "cuda")
        assert no_gpu.returncode == 2 and "torch sees no CUDA device" in no_gpu.stderr


def test_serve_explains_missing_weights(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LORASERVE_LLAMA2_PATH"}
    done = subprocess.run(
        [sys.executable, "-m", "loraserve", "serve", "--data-dir", str(tmp_path), "--model", LORA_MODEL],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 2
    assert "missing weights for @cf/meta-llama/llama-2-7b-chat-hf-lora" in done.stderr
    assert "LORASERVE_LLAMA2_PATH" in done.stderr
    offline = loraserve("serve", "--data-dir", str(tmp_path),
                        "--model", "@cf/x/y-lora=no-such-org/no-such-model",
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert offline.returncode == 2
    assert "could not fetch it from the Hugging Face hub" in offline.stderr
    missing = loraserve(
        "serve", "--data-dir", str(tmp_path), "--model", f"@cf/x/y={tmp_path / 'nothing.gguf'}"
    )
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


def test_quantize_writes_a_gguf_llama_cpp_reads(tmp_path: Path) -> None:
    root = tiny_hf_dir(tmp_path / "hf")
    write_byte_level_tokenizer(root)
    out = tmp_path / "tiny.q8_0.gguf"
    done = runner.invoke(app, ["quantize", str(root), str(out), "--type", "q8_0"])
    assert done.exit_code == 0, done.output
    assert f"wrote {out}" in done.stderr and not list(tmp_path.glob("*.partial"))
    reader = gguf.GGUFReader(out)
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.attn_v.weight"] == "Q8_0"
    again = runner.invoke(app, ["quantize", str(root), str(out), "--type", "q4_0"])
    assert again.exit_code == 2 and "exists (--force replaces it)" in again.stderr
    forced = runner.invoke(app, ["quantize", str(root), str(out), "--type", "q4_0", "--force"])
    assert forced.exit_code == 0, forced.output
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}["blk.0.attn_v.weight"] == "Q4_0"
    mix = runner.invoke(app, ["quantize", str(root), str(out), "--type", "q4_k_m", "--force"])
    assert mix.exit_code == 0, mix.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"], types["output.weight"]) == \
        ("Q4_K", "Q6_K", "Q6_K")  # llama.cpp's Q4_K_M: v in more bits in the last of two layers
    five = runner.invoke(app, ["quantize", str(root), str(out), "--type", "q5_k_m", "--force"])
    assert five.exit_code == 0, five.output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"], types["output.weight"]) == \
        ("Q5_K", "Q6_K", "Q6_K")  # llama.cpp's Q5_K_M: the same mix on Q5_K


def test_quantize_refusals(tmp_path: Path) -> None:
    bad_type = runner.invoke(app, ["quantize", "random:tiny", str(tmp_path / "x.gguf"), "--type", "q5_k"])
    assert bad_type.exit_code == 2 and "'q5_k' is not one of" in bad_type.stderr
    untyped = runner.invoke(app, ["quantize", "random:tiny", str(tmp_path / "x.gguf")])
    assert untyped.exit_code == 2 and "--type is required for random:tiny" in untyped.stderr
    gguf_source = runner.invoke(app, ["quantize", "embedded", str(tmp_path / "x.gguf"), "--type", "q8_0"])
    assert gguf_source.exit_code == 2 and "is a GGUF file already" in gguf_source.stderr
    assert not list(tmp_path.iterdir())


def test_serve_refuses_quantize_where_it_cannot_run(tmp_path: Path) -> None:
    base = ("serve", "--data-dir", str(tmp_path), "--quantize", "q4_0")
    on_gguf = loraserve(*base, "--model", "@cf/test/tiny=embedded")
    assert on_gguf.returncode == 2 and "serve it with --dtype gguf" in on_gguf.stderr
    float_dtype = loraserve(*base, "--model", "@cf/test/tiny=random:tiny", "--dtype", "float32")
    assert float_dtype.returncode == 2 and "needs dtype gguf, not float32" in float_dtype.stderr

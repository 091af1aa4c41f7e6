"""`loraserve serve` (its engine in a process of its own, the default) as a real subprocess: answers /run
whole and streamed, keeps torch out of the API process, runs the engine at a lower CPU priority, and
survives kill -9 of its engine process (the stream in flight ends with an error event, a new run gets 3040
at once, then runs succeed again, with the same finetune)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx

from loraserve.registry import Registry, synth

from conftest import LORA_MODEL
from serve_helpers import ServeProcess

# random:tiny as `serve` builds it (as tests/test_crash.py describes it).
TINY = synth.llama_model_info(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                              vocab_size=49152, context_window=2048)
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
FAILURE_S = 5.0


def _children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _engine_pid(server_pid: int) -> int:
    """The one child that loaded torch (multiprocessing also starts a resource tracker)."""
    [engine] = [child for child in _children(server_pid) if _maps_torch(child)]
    return engine


def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_serve_with_an_engine_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    registry = Registry.open(data_dir)  # closed before the server opens it
    token = registry.create_token("acct")
    registry.close()
    headers = {"Authorization": f"Bearer {token}"}
    with ServeProcess(data_dir, tmp_path / "serve.log", [f"{LORA_MODEL}=random:tiny"],
                      extra_args=("--rate-limit", "0"),
                      env={"LORASERVE_THREADS": "1"}) as serve, httpx.Client(timeout=TIMEOUT) as http:
        serve.start(timeout=120)
        assert serve.proc is not None
        ai = f"{serve.base_url}/client/v4/accounts/acct/ai"
        run_url = f"{ai}/run/{LORA_MODEL}"
        finetune = http.post(f"{ai}/finetunes", headers=headers,
                             json={"model": LORA_MODEL, "name": "ft", "description": ""}).json()["result"]
        files = {"adapter_config.json": synth.adapter_config(8, 16),
                 "adapter_model.safetensors": synth.encode_safetensors(
                     synth.lora_tensors(TINY, 8))}
        for name, blob in files.items():
            uploaded = http.post(f"{ai}/finetunes/{finetune['id']}/finetune-assets", headers=headers,
                                 data={"file_name": name}, files={"file": ("blob", blob)})
            assert uploaded.status_code == 200, uploaded.text

        def run(**inputs: object) -> httpx.Response:
            return http.post(run_url, headers=headers, json={"prompt": "tell me a story", "max_tokens": 5,
                                                            "temperature": 0, **inputs})

        whole = run(lora="ft")
        assert whole.status_code == 200, whole.text
        assert whole.json()["result"]["usage"]["completion_tokens"] == 5
        assert not _maps_torch(serve.proc.pid)
        engine = _engine_pid(serve.proc.pid)
        engine_nice = min(_nice(serve.proc.pid) + 5, 19)  # supervisor.ENGINE_NICE below the API process
        assert _nice(engine) == engine_nice

        long_run = {"prompt": "count", "max_tokens": 1500, "stream": True, "lora": "ft"}
        with http.stream("POST", run_url, headers=headers, json=long_run) as streamed:
            assert streamed.status_code == 200
            lines = streamed.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(engine, signal.SIGKILL)
            killed = time.monotonic()
            rest = [json.loads(line[len("data: "):]) for line in lines
                    if line.startswith("data: ") and line != "data: [DONE]"]
        assert time.monotonic() - killed < FAILURE_S
        # The engine's death is not the finetune's fault (not 3039) and a retry will be served (3040).
        assert rest[-1]["success"] is False and rest[-1]["errors"][0]["code"] == 3040, rest[-1]

        refused = run()
        assert refused.status_code == 429 and refused.json()["errors"][0]["code"] == 3040, refused.text
        deadline = time.monotonic() + 60
        while (again := run(lora="ft")).status_code == 429:
            assert time.monotonic() < deadline, "the engine process never came back"
            time.sleep(0.1)
        assert again.status_code == 200, again.text
        assert again.json()["result"] == whole.json()["result"]  # same weights and finetune: same tokens
        assert (restarted := _engine_pid(serve.proc.pid)) != engine
        assert _nice(restarted) == engine_nice
        assert serve.stop() == 0

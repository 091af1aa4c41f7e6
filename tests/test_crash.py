"""kill -9 of a real `loraserve serve` process during uploads and during generation.

After each kill: the clients of the killed requests failed at once (a transport error, never a hang
nor a timeout), and a server restarted on the same data dir finds a consistent registry: completed
finetunes intact and usable, interrupted ones listed but not ready (3039, not a 500) and repairable
by uploading again, no temp or orphan files left, and a SQLite database that passes integrity_check.

Timings go to stdout (`pytest -s tests/test_crash.py`).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from loraserve.client import Client, StreamInterrupted
from loraserve.registry import Registry, synth
from loraserve.registry.storage import INTENT_PREFIX, TEMP_PREFIX

from conftest import LORA_MODEL, Account
from serve_helpers import ServeProcess, create_token

# random:tiny as `serve` builds it: SmolLM2's tokenizer (vocab 49152), 2 layers, hidden 64.
TINY = synth.llama_model_info(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                              vocab_size=49152, context_window=2048)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# A client must see the failure this soon after the kill; its own timeouts are far longer, so a hang
# shows up as a slow failure or a TimeoutException, both refused below.
PROMPT_FAILURE_S = 3.0
CLIENT_TIMEOUT = httpx.Timeout(20.0, connect=5.0)


def adapter(seed: int) -> dict[str, bytes]:
    return {
        CONFIG: synth.adapter_config(8, 16, ("q_proj", "v_proj")),
        WEIGHTS: synth.encode_safetensors(synth.lora_tensors(TINY, 8, ("q_proj", "v_proj"), seed=seed)),
    }


@dataclass
class Api:
    base_url: str
    account: Account

    @property
    def headers(self) -> dict[str, str]:
        return self.account.headers

    @property
    def ai(self) -> str:
        return f"{self.base_url}/client/v4/accounts/{self.account.id}/ai"

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.ai}{path}", headers=self.headers, timeout=CLIENT_TIMEOUT, **kwargs
        )

    def create(self, name: str) -> str:
        response = self.call(
            "POST", "/finetunes", json={"model": LORA_MODEL, "name": name, "description": ""}
        )
        assert response.status_code == 200, response.text
        finetune_id: str = response.json()["result"]["id"]
        return finetune_id

    def upload(self, finetune_id: str, file_name: str, blob: bytes) -> httpx.Response:
        return self.call("POST", f"/finetunes/{finetune_id}/finetune-assets",
                         data={"file_name": file_name}, files={"file": ("blob", blob)})

    def run(self, lora: str | None = None, **inputs: Any) -> httpx.Response:
        body = {"prompt": "tell me a story", "max_tokens": 4, **inputs}
        if lora is not None:
            body["lora"] = lora
        return self.call("POST", f"/run/{LORA_MODEL}", json=body)

    def names(self) -> dict[str, str]:
        response = self.call("GET", "/finetunes")
        assert response.status_code == 200, response.text
        return {f["name"]: f["id"] for f in response.json()["result"]}


@dataclass
class Outcome:
    """What one client thread saw: its error (or None), and when it ended."""

    error: BaseException | None = None
    ended: float = 0.0
    events: int = 0
    done: bool = False
    started: threading.Event = field(default_factory=threading.Event)


def in_thread(work: Callable[[Outcome], None]) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def target() -> None:
        try:
            work(outcome)
        except BaseException as exc:  # what the client saw is the result
            outcome.error = exc
        finally:
            outcome.ended = time.monotonic()
            outcome.started.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def assert_failed_promptly(name: str, outcome: Outcome, killed_at: float) -> float:
    """A transport error (connection reset, peer closed, incomplete body), never a timeout, soon after."""
    assert outcome.error is not None, f"{name}: no error after the kill (done={outcome.done})"
    # loraserve.client wraps the transport error: the caller learns its text is incomplete.
    error = outcome.error.__cause__ if isinstance(outcome.error, StreamInterrupted) else outcome.error
    assert isinstance(error, httpx.TransportError), f"{name}: {outcome.error!r}"
    assert not isinstance(error, httpx.TimeoutException), f"{name} hung: {outcome.error!r}"
    latency = outcome.ended - killed_at
    assert latency < PROMPT_FAILURE_S, f"{name} took {latency:.2f} s to fail"
    return latency


def integrity_ok(data_dir: Path) -> None:
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()


def leftovers(data_dir: Path) -> list[Path]:
    """Temp uploads and intent markers anywhere under the adapter storage."""
    root = data_dir / "finetunes"
    return sorted(p for p in root.rglob("*") if p.name.startswith((TEMP_PREFIX, INTENT_PREFIX)))


def error_code(response: httpx.Response) -> int:
    code: int = response.json()["errors"][0]["code"]
    return code


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(data dir, the server's TMPDIR: Starlette spools multipart bodies there)."""
    data_dir, spool = tmp_path / "data", tmp_path / "spool"
    spool.mkdir()
    yield data_dir, spool


def serve(data_dir: Path, spool: Path) -> ServeProcess:
    return ServeProcess(data_dir, data_dir.parent / "serve.log", [f"{LORA_MODEL}=random:tiny"],
                        extra_args=("--rate-limit", "0"), env={"TMPDIR": str(spool)})


def slow_multipart(file_name: str, sent: threading.Event, chunk: int = 16 << 10, pause_s: float = 0.02,
                   total: int = 64 << 20) -> Iterator[bytes]:
    """A multipart body that trickles in and would take minutes; `sent` is set after 256 KiB."""
    boundary = "crash-test-boundary"
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file_name"\r\n\r\n{file_name}\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    for offset in range(0, total, chunk):
        if offset >= 256 << 10:
            sent.set()
        yield b"\x01" * chunk
        time.sleep(pause_s)
    yield f"\r\n--{boundary}--\r\n".encode()


def test_kill_during_uploads(workdir: tuple[Path, Path]) -> None:
    data_dir, spool = workdir
    token = create_token(data_dir, "crash")
    complete, later = adapter(seed=1), adapter(seed=2)
    with serve(data_dir, spool) as server:
        first_start = server.start()
        api = Api(server.base_url, Account("crash", token))
        ids = {name: api.create(name) for name in ("complete", "trickled", "half", "receiving")}
        for file_name, blob in complete.items():
            assert api.upload(ids["complete"], file_name, blob).status_code == 200
        assert api.run(ids["complete"]).status_code == 200
        for name in ("trickled", "half", "receiving"):  # the first asset completes; the second is killed
            assert api.upload(ids[name], CONFIG, later[CONFIG]).status_code == 200

        # "trickled": the weights' body is still coming in when the server dies.
        trickling = threading.Event()

        def trickle(outcome: Outcome) -> None:
            headers = {**api.headers, "Content-Type": "multipart/form-data; boundary=crash-test-boundary"}
            httpx.post(f"{api.ai}/finetunes/{ids['trickled']}/finetune-assets", headers=headers,
                       content=slow_multipart(WEIGHTS, trickling), timeout=CLIENT_TIMEOUT)
            outcome.done = True

        trickle_thread, trickled = in_thread(trickle)
        assert trickling.wait(30), "the slow upload did not start"

        # "receiving": the whole body arrived and the server is writing it to its temp file. 32 MiB of
        # garbage (refused once validated) keeps the temp file there long enough to be seen and killed.
        big = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8).tobytes()
        folder = data_dir / "finetunes" / ids["receiving"]
        killed_at, attempts = None, 0
        while killed_at is None and attempts < 3:
            attempts += 1
            upload_thread, receiving = in_thread(lambda o: setattr(o, "done", bool(
                api.upload(ids["receiving"], WEIGHTS, big).status_code)))
            while upload_thread.is_alive():
                if any(folder.glob(f"{TEMP_PREFIX}*")):
                    killed_at = server.kill()
                    break
                time.sleep(0.0005)
            upload_thread.join(10)  # if the server got through the file before the test saw it: again
        assert killed_at is not None, "never caught the server writing the upload's temp file"
        caught = [p.name for p in folder.glob(f"{TEMP_PREFIX}*")]
        upload_thread.join(10)
        trickle_thread.join(10)
        latencies = {
            "trickled upload (mid-body)": assert_failed_promptly("trickled", trickled, killed_at),
            "receiving upload (body sent, server writing)": assert_failed_promptly(
                "receiving", receiving, killed_at
            ),
        }
        assert caught, "the kill left no temp file: the scenario did not happen"
        assert not any(spool.iterdir()), "multipart spool files survived the process"

        restart = server.start()
        assert "1 dead temp files removed" in server.log()
        assert leftovers(data_dir) == []
        integrity_ok(data_dir)
        assert api.names() == ids
        # The completed finetune: byte-identical and usable.
        for file_name, blob in complete.items():
            assert (data_dir / "finetunes" / ids["complete"] / file_name).read_bytes() == blob
        assert api.run(ids["complete"]).status_code == 200
        # The interrupted ones: listed, config kept, not ready, a clean 3039 on /run.
        with Registry.open(data_dir) as registry:
            for name in ("trickled", "half", "receiving"):
                record = registry.get_finetune("crash", ids[name])
                assert record.has_config and not record.has_weights and not record.ready, name
        for name in ("trickled", "half", "receiving"):
            refused = api.run(ids[name])
            assert refused.status_code == 400 and error_code(refused) == 3039, refused.text
            assert sorted(p.name for p in (data_dir / "finetunes" / ids[name]).iterdir()) == [CONFIG]
        # Uploading the missing file again completes them.
        for name in ("trickled", "half", "receiving"):
            assert api.upload(ids[name], WEIGHTS, later[WEIGHTS]).status_code == 200
            assert api.run(ids[name]).status_code == 200
        assert server.stop() == 0
    integrity_ok(data_dir)
    print(f"\nupload crash: first start {first_start:.2f} s, restart {restart:.2f} s, temp file caught on "
          f"attempt {attempts}, "
          + ", ".join(f"{k}: failed after {v * 1000:.0f} ms" for k, v in latencies.items()))


def sse_stream(api: Api, lora: str | None, outcome: Outcome, max_tokens: int = 1800) -> None:
    # Greedy: deterministic, so no stream can end early on a sampled end-of-sequence token by chance.
    body: dict[str, Any] = {"prompt": "tell me a long story", "stream": True, "max_tokens": max_tokens,
                            "temperature": 0}
    if lora is not None:
        body["lora"] = lora
    with httpx.stream("POST", f"{api.ai}/run/{LORA_MODEL}", headers=api.headers, json=body,
                      timeout=CLIENT_TIMEOUT) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                outcome.done = True
            elif line.startswith("data:"):
                outcome.events += 1
                outcome.started.set()


def test_kill_during_generation_and_finetune_writes(workdir: tuple[Path, Path]) -> None:
    data_dir, spool = workdir
    token = create_token(data_dir, "gen")
    files = adapter(seed=3)
    with serve(data_dir, spool) as server:
        server.start()
        api = Api(server.base_url, Account("gen", token))
        keep, gone = api.create("keep"), api.create("gone")
        for finetune_id in (keep, gone):
            for file_name, blob in files.items():
                assert api.upload(finetune_id, file_name, blob).status_code == 200
        # Killed right after a delete answered: the row and the files are already gone.
        assert api.call("DELETE", f"/finetunes/{gone}").status_code == 200
        assert not (data_dir / "finetunes" / gone).exists()

        def with_client(outcome: Outcome) -> None:
            with Client("gen", token, server.base_url, timeout=20.0) as client, \
                    client.stream(LORA_MODEL, {"prompt": "hello", "max_tokens": 1800, "lora": "keep",
                                               "temperature": 0}) as deltas:
                for _text in deltas:
                    outcome.events += 1
                    outcome.started.set()
                outcome.done = True

        clients: list[Callable[[Outcome], None]] = [
            *(partial(sse_stream, api, lora) for lora in (keep, keep, None)),
            with_client,
        ]
        streams = [in_thread(client) for client in clients]
        # Finetune creates keep arriving while the server dies.
        created: list[str] = []
        stop_creating = threading.Event()

        def create_loop(outcome: Outcome) -> None:
            for i in range(10_000):
                if stop_creating.is_set():
                    return
                name = f"burst-{i}"
                response = api.call("POST", "/finetunes", json={"model": LORA_MODEL, "name": name})
                if response.status_code == 200:
                    created.append(name)
                outcome.started.set()

        creator_thread, creator = in_thread(create_loop)
        for _thread, outcome in [*streams, (creator_thread, creator)]:
            assert outcome.started.wait(30)
        # Until tokens flow to every stream at once. random:tiny writes a stream's 1,800 tokens in ~2.5 s, and
        # on two cores shared with the create loop one stream's first events can come a second or two after
        # the others' (a burst of hundreds, generated meanwhile): a stream near its end before the others
        # began is replaced by a new one (the old one's outcome is not checked), so that the kill finds four
        # in flight.
        def flowing(o: Outcome) -> bool:
            return 3 <= o.events <= 1200 and not o.done

        deadline = time.monotonic() + 30
        while not all(flowing(o) for _t, o in streams) and time.monotonic() < deadline:
            streams = [in_thread(client) if (o.done or o.events > 1200) and o.error is None else (t, o)
                       for client, (t, o) in zip(clients, streams, strict=True)]
            time.sleep(0.005)
        assert all(o.events >= 3 and o.error is None and not o.done for _t, o in streams), streams
        events = [o.events for _t, o in streams]
        killed_at = server.kill()
        stop_creating.set()
        for thread, _outcome in [*streams, (creator_thread, creator)]:
            thread.join(10)
        latencies = [assert_failed_promptly(f"stream {i}", o, killed_at) for i, (_t, o) in enumerate(streams)]
        assert_failed_promptly("finetune creates", creator, killed_at)
        assert all(not o.done for _t, o in streams)

        restart = server.start()
        integrity_ok(data_dir)
        assert leftovers(data_dir) == []
        names = api.names()
        assert names["keep"] == keep and "gone" not in names
        assert set(created) <= set(names)  # every create answered 200 survived
        assert not (data_dir / "finetunes" / gone).exists()
        assert api.call("GET", f"/finetunes/{gone}").status_code == 404
        for file_name, blob in files.items():
            assert (data_dir / "finetunes" / keep / file_name).read_bytes() == blob
        assert api.run("keep").status_code == 200
        again = Outcome()
        sse_stream(api, "keep", again, max_tokens=32)  # a whole stream, to its [DONE]
        assert again.done and again.events > 1
        with Registry.open(data_dir) as registry:
            assert registry.get_finetune("gen", "keep").ready
            assert not any(registry.get_finetune("gen", n).ready for n in created)
        assert server.stop() == 0
    integrity_ok(data_dir)
    print(f"\ngeneration crash: {len(streams)} streams and a create loop failed after "
          f"{json.dumps([round(v * 1000) for v in latencies])} ms (events received by then: {events}); "
          f"{len(created)} creates answered 200 and survived; restart {restart:.2f} s")


def test_serve_refuses_a_corrupt_registry_before_loading_models(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with Registry.open(data_dir) as registry:
        registry.create_token("corrupt")
        for i in range(20):
            registry.create_finetune("corrupt", LORA_MODEL, f"ft-{i}", description="x" * 300)
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'finetunes'").fetchone()[0]
    db.close()
    with open(data_dir / "registry.sqlite3", "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    done = subprocess.run([sys.executable, "-m", "loraserve", "serve", "--data-dir", str(data_dir),
                           "--model", f"{LORA_MODEL}=random:tiny", "--port", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "quick_check" in done.stderr and "restore the database from a backup" in done.stderr
    assert "loading" not in done.stderr  # refused before the (slow) model loading

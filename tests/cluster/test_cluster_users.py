"""What users see of a cluster, on a real local Ray: their tools unchanged, and kill -9 of an engine replica
under their streams and uploads.

The official `cloudflare` SDK's and wrangler's own tests (tests/test_sdk_cloudflare.py and
tests/test_wrangler.py) are collected again here, their `server` fixture being the cluster: a Workers AI
user changes only the base URL, whether it points at one process or at a Ray Serve application.

Then the kill (last in the module: it runs after the others). Two engine replicas of random:tiny, two running
slots each; a finetune's eight long streams all go to the replica holding its adapter, where two run and six
wait in its queue; that replica is killed while they do. What must hold: the six that had produced nothing are
sent to the other replica and succeed (their callers see a plain 200 stream); the two already started end with
an error event, never hang; the upload going on meanwhile lands whole; new requests are served at once; Serve
starts a new replica and the cluster is two replicas again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.api import ServerSettings
from loraserve.registry import Registry, synth
from loraserve.registry.records import AssetFile

import test_sdk_cloudflare as sdk
import test_wrangler as wrangler
from conftest import LORA_MODEL, NO_LORA_MODEL, Account, LiveServer, ok, upload

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'loraserve[cluster]'")
from ray._private import state as ray_state

from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.local import APP_NAME
from loraserve.cluster.replica_header import REPLICA_HEADER
from loraserve.tools.routing_bench.cluster import application, local_serve

TINY = synth.llama_model_info(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                              vocab_size=49152, context_window=2048)
TIMEOUT = httpx.Timeout(120.0, connect=5.0)
RUNNING = 2  # a replica's running slots (max_num_seqs)
STREAMS = 8  # one finetune's, all on the replica holding it: RUNNING run, the others wait in its queue
# Replicas report the adapters they hold every 0.1 s; Serve's controller then tells the gateway's router.
ROUTING_SETTLE_S = 3.0
# Long enough that the running streams are still running when the replica dies.
LONG = {"prompt": "tell me a long story", "max_tokens": 1500, "temperature": 0, "stream": True}
RESTORED_WITHIN_S = 120.0


# Collected here in this order, before the kill below. `cf` is the SDK tests' client fixture.
cf = sdk.cf
test_sdk_run_prompt_and_messages = sdk.test_run_prompt_and_messages
test_sdk_run_streaming = sdk.test_run_streaming
test_sdk_errors_surface_as_sdk_exceptions = sdk.test_errors_surface_as_sdk_exceptions
test_sdk_finetunes_create_upload_list_and_run = sdk.test_finetunes_create_upload_list_and_run
test_sdk_public_finetunes_list = sdk.test_public_finetunes_list
test_wrangler_finetune_create_and_list_then_run = wrangler.pytestmark(
    wrangler.test_finetune_create_and_list_then_run)
test_wrangler_whoami_names_the_tokens_account = wrangler.pytestmark(
    wrangler.test_whoami_names_the_tokens_account)


@pytest.fixture(scope="module")
def server(cluster: LiveServer) -> LiveServer:
    """The fixture the SDK's and wrangler's tests ask for."""
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("faults-data")
    registry = Registry.open(data_dir)
    config = ClusterConfig(models=(f"{LORA_MODEL}=random:tiny", f"{NO_LORA_MODEL}=random:tiny"),
                           data_dir=data_dir, replicas=2,
                           engine_num_cpus=1, gateway_num_cpus=0.5, stats_interval_s=0.25,
                           engine={"max_num_seqs": RUNNING, "max_queue": 8},
                           server=ServerSettings(rate_limit_per_minute=0))
    try:
        with local_serve(num_cpus=8) as base_url, application(config):
            yield LiveServer(base_url, registry, {})
    finally:
        registry.close()


@dataclass
class Stream:
    """What one streaming client saw."""

    status: int | None = None
    replica: str | None = None
    texts: int = 0  # text events before the end
    done: bool = False  # ended with [DONE]
    error: dict[str, object] | None = None  # ended with an error event
    failure: str | None = None  # the client's own exception
    first_text: threading.Event = field(default_factory=threading.Event)


def _stream(cluster: LiveServer, account: Account, finetune: str, seen: Stream) -> None:
    try:
        with httpx.Client(timeout=TIMEOUT) as client, client.stream(
                "POST", cluster.run_url(account), headers=account.headers,
                json={**LONG, "lora": finetune}) as response:
            seen.status = response.status_code
            seen.replica = response.headers.get(REPLICA_HEADER)
            if response.status_code != 200:
                response.read()
                seen.error = response.json()
                return
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    seen.done = True
                    return
                event = json.loads(data)
                if "errors" in event:
                    seen.error = event
                    return
                if event.get("response"):
                    seen.texts += 1
                    seen.first_text.set()
    except Exception as exc:  # reported by the test, which would otherwise hang on the thread
        seen.failure = repr(exc)
    finally:
        seen.first_text.set()


def _engine_replica_pids() -> dict[str, int]:
    """replica id -> pid of every live engine replica. Ray's own actor table (its public state API needs
    the dashboard, which these tests do not start); Serve names a replica's actor
    `SERVE_REPLICA::<app>#<deployment>#<replica id>`."""
    actors = ray_state.actors(actor_state_name="ALIVE")
    prefix = f"SERVE_REPLICA::{APP_NAME}#Engine#"
    return {actor["Name"].removeprefix(prefix): actor["Pid"]
            for actor in actors.values() if actor["Name"].startswith(prefix)}


def _retries(http: httpx.Client, cluster: LiveServer) -> float:
    text = http.get(f"{cluster.base_url}/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "loraserve_request_retries" for sample in family.samples)


def test_kill_9_of_an_engine_replica_under_streams_and_an_upload(cluster: LiveServer) -> None:
    account = cluster.new_account()
    http = httpx.Client(timeout=TIMEOUT)
    before = _engine_replica_pids()
    assert len(before) == 2, before
    assert _retries(http, cluster) == 0

    # A finetune's streams all go to the replica holding its adapter (multiplexing; it has room for them).
    finetune = ok(http.post(f"{cluster.ai_url(account)}/finetunes", headers=account.headers,
                            json={"model": LORA_MODEL, "name": "long", "description": ""}))["id"]
    ok(upload(cluster, account, finetune, "adapter_config.json", synth.adapter_config(8, 16)))
    ok(upload(cluster, account, finetune, "adapter_model.safetensors",
              synth.encode_safetensors(synth.lora_tensors(TINY, 8, seed=2))))
    first = http.post(cluster.run_url(account), headers=account.headers,
                      json={"prompt": "hi", "max_tokens": 1, "lora": finetune})
    ok(first)
    victim = first.headers[REPLICA_HEADER]
    time.sleep(ROUTING_SETTLE_S)
    seen = [Stream() for _ in range(STREAMS)]
    threads = [threading.Thread(target=_stream, args=(cluster, account, finetune, s), daemon=True)
               for s in seen]
    for thread in threads:
        thread.start()
    # Once RUNNING of them stream, the others wait behind them in the victim's queue.
    deadline = time.monotonic() + 60
    while sum(1 for s in seen if s.texts) < RUNNING:
        assert time.monotonic() < deadline, [s.failure or s.error for s in seen]
        time.sleep(0.02)
    assert {s.replica for s in seen if s.texts} == {victim}
    created = ok(http.post(f"{cluster.ai_url(account)}/finetunes", headers=account.headers,
                           json={"model": LORA_MODEL, "name": "during-the-kill", "description": ""}))
    weights = synth.encode_safetensors(synth.lora_tensors(TINY, 8, seed=3))
    uploading = threading.Thread(target=lambda: ok(upload(cluster, account, created["id"],
                                                          "adapter_model.safetensors", weights)))
    uploading.start()
    os.kill(before[victim], signal.SIGKILL)
    uploading.join(60)
    ok(upload(cluster, account, created["id"], "adapter_config.json", synth.adapter_config(8, 16)))

    for thread in threads:
        thread.join(RESTORED_WITHIN_S)
        assert not thread.is_alive(), "a stream hung after its replica died"
    assert [s.failure for s in seen] == [None] * STREAMS
    # Every request was answered 200: those that waited on the dead replica were sent to the other one.
    assert [s.status for s in seen] == [200] * STREAMS, [s.error for s in seen]
    cut = [s for s in seen if not s.done]
    assert len(cut) == RUNNING
    for s in cut:  # started streams end with Workers AI's try-again error event, after their tokens
        assert s.replica == victim and s.texts > 0, s
        assert s.error is not None and s.error["errors"] == [
            {"code": 3040, "message": "The model stopped before this request finished, please try again."}]
    # The queued ones ran on the other replica, which loaded the adapter for them.
    assert [s.replica != victim for s in seen if s.done] == [True] * (STREAMS - RUNNING)
    assert _retries(http, cluster) == STREAMS - RUNNING

    # Served at once by the survivor, the finetune uploaded meanwhile included, whole.
    run = ok(http.post(cluster.run_url(account), headers=account.headers,
                       json={"prompt": "hi", "max_tokens": 3, "lora": "during-the-kill"}))
    assert run["usage"]["completion_tokens"] == 3
    stored = cluster.registry.storage.path(created["id"], AssetFile.WEIGHTS)
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(weights).digest()

    # Serve replaces the dead replica.
    deadline = time.monotonic() + RESTORED_WITHIN_S
    while len(after := _engine_replica_pids()) < 2 or victim in after:
        assert time.monotonic() < deadline, f"still {after} after {RESTORED_WITHIN_S} s"
        time.sleep(0.5)
    http.close()

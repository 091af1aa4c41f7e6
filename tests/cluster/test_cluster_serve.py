"""The Ray Serve application on a real local Ray: the gateway (the FastAPI app) and two engine replicas of
random:tiny behind Serve's HTTP proxy on loopback. One Ray and one application for the module: starting
them is the slow part (a replica loads torch and the model).

What is checked: /run whole and streamed, with the serving replica named in a header; a finetune uploaded
through the gateway runs, and its requests keep to the replica that holds its adapter while a second
adapter goes to the other one, and a burst beyond its replica's capacity spills to the other; base-model
requests go to either; deleting a finetune drops it from the replicas' caches; bad requests still get the
Workers AI envelope; /metrics shows each replica and where each request's adapter was; a session's
requests (x-session-affinity) keep to one replica and find their prefix cached, and sessions spread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.api import ServerSettings
from loraserve.registry import Registry, synth

from conftest import LORA_MODEL, Account, LiveServer, fails, ok, upload

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'loraserve[cluster]'")
from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.replica_header import REPLICA_HEADER
from loraserve.tools.routing_bench.cluster import application, local_serve

# random:tiny as the engine builds it (SmolLM2's vocabulary, 2 layers, hidden 64).
TINY = synth.llama_model_info(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                              vocab_size=49152, context_window=2048)
TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# Replicas report the adapters they hold every 0.1 s; Serve's controller then tells the gateway's router.
ROUTING_SETTLE_S = 3.0
RUN = {"prompt": "tell me a story", "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("cluster-data")
    registry = Registry.open(data_dir)  # the test's own view of the registry the gateway shares: tokens
    config = ClusterConfig(models=(f"{LORA_MODEL}=random:tiny",), data_dir=data_dir, replicas=2,
                           engine_num_cpus=1, gateway_num_cpus=0.5, stats_interval_s=0.25,
                           engine={"max_num_seqs": 4, "max_queue": 8},
                           server=ServerSettings(rate_limit_per_minute=0))
    try:
        with local_serve(num_cpus=8) as base_url, application(config):
            yield LiveServer(base_url, registry, {})
    finally:
        registry.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def _run(http: httpx.Client, cluster: LiveServer, account: Account, **inputs: Any) -> httpx.Response:
    return http.post(cluster.run_url(account), headers=account.headers, json={**RUN, **inputs})


def _finetune(http: httpx.Client, cluster: LiveServer, account: Account, name: str, seed: int) -> str:
    """A finetune made and uploaded through the gateway, as wrangler does."""
    created = ok(http.post(f"{cluster.ai_url(account)}/finetunes", headers=account.headers,
                           json={"model": LORA_MODEL, "name": name, "description": ""}))
    files = {"adapter_config.json": synth.adapter_config(8, 16),
             "adapter_model.safetensors": synth.encode_safetensors(synth.lora_tensors(TINY, 8, seed=seed))}
    for file_name, blob in files.items():
        ok(upload(cluster, account, created["id"], file_name, blob))
    finetune_id: str = created["id"]
    return finetune_id


def _served_by(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    replica = response.headers.get(REPLICA_HEADER)
    assert replica, f"no {REPLICA_HEADER} header: {dict(response.headers)}"
    return replica


def test_run_whole_and_streamed(cluster: LiveServer, http: httpx.Client) -> None:
    account = cluster.new_account()
    whole = _run(http, cluster, account)
    result = ok(whole)
    assert result["usage"]["completion_tokens"] == 5
    _served_by(whole)
    with http.stream("POST", cluster.run_url(account), headers=account.headers,
                     json={**RUN, "stream": True}) as streamed:
        _served_by(streamed)
        data = [line.removeprefix("data: ") for line in streamed.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    assert events[-1]["usage"]["completion_tokens"] == 5
    # Greedy, and both replicas hold the same weights: the same text wherever it ran.
    assert "".join(event["response"] for event in events) == result["response"]


def test_a_finetune_keeps_to_the_replica_that_holds_it(cluster: LiveServer, http: httpx.Client) -> None:
    account = cluster.new_account()
    first = _finetune(http, cluster, account, "first", seed=1)
    second = _finetune(http, cluster, account, "second", seed=2)
    holder = _served_by(_run(http, cluster, account, lora="first"))
    time.sleep(ROUTING_SETTLE_S)
    assert {_served_by(_run(http, cluster, account, lora=first)) for _ in range(3)} == {holder}
    # No replica holds the second adapter: Serve sends it to the one holding fewer adapters, the other.
    other = _served_by(_run(http, cluster, account, lora="second", stream=True))
    assert other != holder
    time.sleep(ROUTING_SETTLE_S)
    assert {_served_by(_run(http, cluster, account, lora=second)) for _ in range(2)} == {other}
    # Base-model requests name no adapter: either replica may take them.
    assert {_served_by(_run(http, cluster, account)) for _ in range(4)} <= {holder, other}

    # Deleting a finetune drops its adapter from every replica's caches (Serve's broadcast).
    assert _adapters_in_host_memory(http, cluster) == 2
    ok(http.delete(f"{cluster.ai_url(account)}/finetunes/{first}", headers=account.headers))
    deadline = time.monotonic() + 10
    while _adapters_in_host_memory(http, cluster) != 1:
        assert time.monotonic() < deadline, "the deleted adapter is still in a replica's host memory"
        time.sleep(0.25)
    fails(_run(http, cluster, account, lora=first), 404, 3037)


# What one engine replica takes at once: the fixture's max_num_seqs running, max_queue more queued.
RUNNING, REPLICA_CAPACITY = 4, 12


def test_a_busy_finetune_spills_to_the_other_replica(cluster: LiveServer, http: httpx.Client) -> None:
    account = cluster.new_account()
    finetune = _finetune(http, cluster, account, "busy", seed=5)
    holder = _served_by(_run(http, cluster, account, lora=finetune))
    time.sleep(ROUTING_SETTLE_S)
    stop, running = threading.Event(), threading.Semaphore(0)

    def hold(_: int) -> tuple[int, str | None]:
        """A stream of the finetune that runs (or waits in the engine's queue) until the test is done."""
        with httpx.Client(timeout=TIMEOUT) as client, client.stream(
                "POST", cluster.run_url(account), headers=account.headers,
                json={**RUN, "lora": finetune, "max_tokens": 1900, "stream": True}) as response:
            running.release()
            for _ in response.iter_lines():
                if stop.is_set():
                    break
            return response.status_code, response.headers.get(REPLICA_HEADER)

    with ThreadPoolExecutor(REPLICA_CAPACITY) as pool:
        held = []
        for i in range(REPLICA_CAPACITY):  # one at a time: Serve's router queues at most max_queue at once
            held.append(pool.submit(hold, i))
            time.sleep(0.1)
        try:
            for _ in range(RUNNING):
                assert running.acquire(timeout=60)
            time.sleep(0.5)  # the others reach the holder's queue: it is full
            # While it is, the finetune's next runs go to the other replica rather than wait for a slot.
            spilled = {_served_by(_run(http, cluster, account, lora=finetune, max_tokens=2))
                       for _ in range(3)}
        finally:
            stop.set()  # the held streams close; the holder aborts them
        answers = [future.result() for future in held]
    assert set(answers) == {(200, holder)}, answers
    assert len(spilled) == 1 and holder not in spilled
    _until_idle(http, cluster)  # the aborted streams leave the engines before the next test counts


def _until_idle(http: httpx.Client, cluster: LiveServer) -> None:
    deadline = time.monotonic() + 30
    while True:
        text = http.get(f"{cluster.base_url}/metrics").text
        busy = sum(sample.value for family in text_string_to_metric_families(text)
                   if family.name in ("loraserve_running_requests", "loraserve_queue_depth")
                   for sample in family.samples)
        if busy == 0:
            return
        assert time.monotonic() < deadline, f"{busy} requests still in the engines"
        time.sleep(0.25)


def _adapters_in_host_memory(http: httpx.Client, cluster: LiveServer) -> float:
    """The gateway's /metrics: the host tier summed over the replicas it polls."""
    text = http.get(f"{cluster.base_url}/metrics").text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "loraserve_adapters_resident"]
    return sum(sample.value for sample in family.samples if sample.labels["tier"] == "host")


def test_bad_requests_get_the_workers_ai_envelope(cluster: LiveServer, http: httpx.Client) -> None:
    account = cluster.new_account()
    bad_input = _run(http, cluster, account, prompt=42)
    fails(bad_input, 400, 5006)
    assert REPLICA_HEADER not in bad_input.headers  # refused before any replica saw it
    fails(_run(http, cluster, account, lora="no-such-finetune"), 404, 3037)
    fails(_run(http, cluster, account, max_tokens=4096), 413, 5021)  # over random:tiny's 2048 window
    other = cluster.new_account()
    fails(http.post(cluster.run_url(other), headers=account.headers, json=RUN), 401, 10000)
    fails(http.get(f"{cluster.base_url}/client/v4/nowhere"), 404, 7003)


Sample = tuple[str, str, str]  # metric name, replica, adapter routing or tier ("" for neither)


def test_metrics_show_each_replica_and_where_its_adapters_were(cluster: LiveServer,
                                                                http: httpx.Client) -> None:
    """Per-replica series: a finetune's first request loads it on one replica; the later ones, kept to that
    replica by affinity, find it resident there."""
    account = cluster.new_account()
    finetune = _finetune(http, cluster, account, "observed", seed=3)
    before = _per_replica(http, cluster)
    holder = _served_by(_run(http, cluster, account, lora=finetune))
    time.sleep(ROUTING_SETTLE_S)
    assert {_served_by(_run(http, cluster, account, lora=finetune)) for _ in range(3)} == {holder}

    def moved(after: dict[Sample, float], name: str, replica: str, label: str = "") -> float:
        return after.get((name, replica, label), 0.0) - before.get((name, replica, label), 0.0)

    hits, routed = "loraserve_replica_adapter_hits_total", "loraserve_replica_requests_total"
    deadline = time.monotonic() + 10  # the replicas' own counters reach the gateway with its next poll
    while moved(after := _per_replica(http, cluster), hits, holder) < 3:
        assert time.monotonic() < deadline, "the holder's adapter hits never reached the gateway"
        time.sleep(0.25)
    assert moved(after, hits, holder) == 3
    assert moved(after, routed, holder, "loaded") == 1 and moved(after, routed, holder, "resident") == 3
    assert after[("loraserve_replica_adapters_resident", holder, "host")] >= 1
    polled = {replica for name, replica, _ in after if name == "loraserve_replica_kv_blocks_free"}
    assert len(polled) == 2 and holder in polled
    [other] = polled - {holder}
    assert moved(after, routed, other, "loaded") == moved(after, routed, other, "resident") == 0


def _per_replica(http: httpx.Client, cluster: LiveServer) -> dict[Sample, float]:
    """The gateway's per-replica samples of the model."""
    text = http.get(f"{cluster.base_url}/metrics").text
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("loraserve_replica_"):
            for sample in family.samples:
                if sample.labels["model"] == LORA_MODEL and "replica" in sample.labels:
                    kind = sample.labels.get("adapter", sample.labels.get("tier", ""))
                    samples[(sample.name, sample.labels["replica"], kind)] = sample.value
    return samples


# Workers AI's session header; a raw prompt, so that each turn's prompt begins with the one before it.
SESSION_AFFINITY = "x-session-affinity"
CONVERSATION = "[INST] " + "The quick brown fox jumps over the lazy dog. " * 4


def test_a_sessions_requests_keep_to_one_replica_and_find_their_prefix_cached(
        cluster: LiveServer, http: httpx.Client) -> None:
    account = cluster.new_account()  # the prefix cache is scoped by account: nothing cached for it yet
    _both_replicas(http, cluster, account)
    session = {**account.headers, SESSION_AFFINITY: "conversation-7f3a"}
    replicas, cached = set(), []
    for turn in range(6):
        prompt = CONVERSATION + "".join(f" Turn {i} of the talk." for i in range(turn)) + " [/INST]"
        response = http.post(cluster.run_url(account), headers=session,
                             json={"prompt": prompt, "raw": True, "max_tokens": 2, "temperature": 0})
        replicas.add(_served_by(response))
        cached.append(response.json()["result"]["usage"]["prompt_tokens_details"]["cached_tokens"])
    # Spread by load, six requests would land on one of two replicas once in 32 runs.
    assert len(replicas) == 1
    assert cached[0] == 0 and all(tokens > 0 for tokens in cached[1:]), cached


def test_sessions_spread_over_the_replicas(cluster: LiveServer, http: httpx.Client) -> None:
    account = cluster.new_account()
    both = _both_replicas(http, cluster, account)
    homes: dict[str, set[str]] = {}
    for i in range(16):
        session = {**account.headers, SESSION_AFFINITY: f"user-{i}:chat"}
        for _ in range(2):
            response = http.post(cluster.run_url(account), headers=session, json={**RUN, "max_tokens": 1})
            homes.setdefault(f"user-{i}", set()).add(_served_by(response))
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert set().union(*homes.values()) == both


def _both_replicas(http: httpx.Client, cluster: LiveServer, account: Account) -> set[str]:
    """The two engine replicas, once the gateway's router has sent requests to both: it knows of both, so
    a session's replica is chosen among the two from then on."""
    seen: set[str] = set()

    def one(_: int) -> str:  # four at a time: one after another, the router may keep to one replica
        with httpx.Client(timeout=TIMEOUT) as client:
            return _served_by(_run(client, cluster, account, max_tokens=1))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(10):
            seen.update(pool.map(one, range(4)))
            if len(seen) == 2:
                return seen
    raise AssertionError(f"40 base-model requests all went to {seen}")

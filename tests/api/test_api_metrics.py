"""GET /metrics on a live server: counters, histograms and engine gauges move as real requests run."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.api.metrics import Metrics
from loraserve.api.metrics_adapters import AdapterRequestCounter
from loraserve.api.metrics_replicas import AdapterRouting, ReplicaStats

from conftest import LORA_MODEL, Account, LiveServer, create_finetune

RUN_ROUTE = "/run/{model:path}"
Labels = tuple[tuple[str, str], ...]


def scrape(server: LiveServer) -> dict[str, dict[Labels, float]]:
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def delta(before: dict[str, dict[Labels, float]], after: dict[str, dict[Labels, float]], name: str,
          **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def run(
    server: LiveServer, account: Account, body: dict[str, Any], model: str = LORA_MODEL
) -> httpx.Response:
    return httpx.post(server.run_url(account, model), headers=account.headers, json=body, timeout=60)


def test_requests_tokens_and_latencies_are_counted(server: LiveServer, account: Account) -> None:
    before = scrape(server)
    whole = run(
        server, account, {"prompt": "tell me a story", "max_tokens": 5, "temperature": 0}
    ).json()["result"]
    with httpx.stream("POST", server.run_url(account), headers=account.headers, timeout=60,
                      json={"prompt": "hi", "max_tokens": 4, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    streamed = json.loads(events[-1].removeprefix("data: "))["usage"]
    chat = httpx.post(f"{server.ai_url(account)}/v1/chat/completions", headers=account.headers, timeout=60,
                      json={"model": LORA_MODEL, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 3})
    openai_usage = chat.json()["usage"]
    assert run(server, account, {"prompt": "x"}, model="@cf/nope/nothing").status_code == 400
    assert httpx.post(server.run_url(account), json={"prompt": "x"}).status_code == 401
    after = scrape(server)

    model = {"model": LORA_MODEL}
    assert delta(before, after, "loraserve_http_requests_total", route=RUN_ROUTE, method="POST",
                 status="200") == 2
    assert delta(before, after, "loraserve_http_requests_total", route="/v1/chat/completions", method="POST",
                 status="200") == 1
    assert delta(before, after, "loraserve_http_errors_total", route=RUN_ROUTE, status="400",
                 code="5007") == 1
    assert delta(before, after, "loraserve_http_errors_total", route=RUN_ROUTE, status="401",
                 code="10000") == 1
    assert delta(before, after, "loraserve_http_request_duration_seconds_count", route=RUN_ROUTE) == 4
    usages = [whole["usage"], streamed, openai_usage]
    assert delta(before, after, "loraserve_prompt_tokens_total", **model) \
        == sum(u["prompt_tokens"] for u in usages)
    assert delta(before, after, "loraserve_generation_tokens_total", **model) == 5 + 4 + 3
    assert delta(before, after, "loraserve_generations_total", finish_reason="length", **model) == 3
    assert delta(before, after, "loraserve_time_to_first_token_seconds_count", **model) == 3
    assert delta(before, after, "loraserve_time_to_first_token_seconds_sum", **model) > 0
    assert delta(before, after, "loraserve_time_per_output_token_seconds_count", **model) == 3
    assert delta(before, after, "loraserve_adapter_requests_total", adapter="none") == 3


def test_requests_per_adapter_and_adapters_resident(server: LiveServer, peft_adapter: Any) -> None:
    owner = server.new_account("metrics")
    finetune = create_finetune(server, owner, "metered", peft_adapter())
    before = scrape(server)
    for _ in range(2):
        assert run(server, owner, {"prompt": "hi", "max_tokens": 2, "lora": "metered"}).status_code == 200
    after = scrape(server)
    assert delta(before, after, "loraserve_adapter_requests_total", adapter=finetune["id"]) == 2
    # Loaded from disk once; the second request found it in memory.
    assert delta(before, after, "loraserve_adapter_loads_total", model=LORA_MODEL) == 1
    assert delta(before, after, "loraserve_adapter_hits_total", model=LORA_MODEL) == 1
    resident = sum(value(after, "loraserve_adapters_resident", model=LORA_MODEL, tier=tier)
                   for tier in ("device", "host"))
    assert resident >= 1


def wait_for(condition: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_engine_gauges_follow_a_running_request(server: LiveServer, account: Account) -> None:
    idle = scrape(server)
    total = value(idle, "loraserve_kv_blocks_used", model=LORA_MODEL) + value(
        idle, "loraserve_kv_blocks_free", model=LORA_MODEL)
    assert total > 0
    body = {"prompt": "hi", "raw": True, "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", server.run_url(account), headers=account.headers, json=body, timeout=60
    ) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the response
        assert next(lines).startswith("data: {")  # the generation is under way
        # The engine publishes its stats after each step: the scrape sees them within a step or two.
        assert wait_for(lambda: value(scrape(server), "loraserve_running_requests", model=LORA_MODEL) >= 1)
        busy = scrape(server)
        assert value(busy, "loraserve_kv_blocks_used", model=LORA_MODEL) > 0
        assert value(busy, "loraserve_kv_blocks_free", model=LORA_MODEL) < total
        assert ("loraserve_queue_depth", (("model", LORA_MODEL),)) in [
            (name, labels) for name, series in busy.items() for labels in series]
    # Hanging up aborts the generation: its KV blocks come back.
    assert wait_for(lambda: value(scrape(server), "loraserve_kv_blocks_used", model=LORA_MODEL) == 0)
    after = scrape(server)
    assert value(after, "loraserve_kv_blocks_free", model=LORA_MODEL) == total
    assert value(after, "loraserve_generations_total", model=LORA_MODEL, finish_reason="abort") >= 1


def test_adapter_label_cardinality_is_bounded() -> None:
    counter = AdapterRequestCounter(top_n=2, max_series=3)
    for key in ["a", "a", "b", "c", None, "c", "c", "d", "e", "e", "e", "e", "f"]:
        counter.add(key)
    samples = dict(counter.samples())
    # a, b and c got series while in the top 2; the cap of 3 series sends e's burst to "other".
    assert samples == {"none": 1, "a": 2, "b": 1, "c": 3, "other": 6}
    assert sum(samples.values()) == 13
    before = dict(counter.samples())
    for key in ["a", "zz", "zz", "zz"]:
        counter.add(key)
    after = dict(counter.samples())
    assert set(after) == set(before)  # no new label values, ever
    assert all(after[k] >= before[k] for k in before)  # counters only go up
    with pytest.raises(ValueError):
        AdapterRequestCounter(top_n=-1)


def test_a_metrics_token_guards_the_scrape(server: LiveServer, tiny_backend: Any) -> None:
    token = "scrape-" + "x" * 20
    app = create_app(server.registry, {LORA_MODEL: tiny_backend}, ServerSettings(metrics_token=token))
    with BackgroundServer(app) as live:
        url = f"{live.base_url}/metrics"
        for headers in (
            {}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {token}"}
        ):
            refused = httpx.get(url, headers=headers)
            assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == 10000
            assert "loraserve_" not in refused.text
        allowed = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert allowed.status_code == 200 and "loraserve_kv_blocks_used" in allowed.text
        assert httpx.get(f"{live.base_url}/healthz").status_code == 200  # health stays open for probes
    for bad in ("short", " padded-token-padded-token "):
        with pytest.raises(ValueError, match="metrics_token"):
            ServerSettings(metrics_token=bad)


class _TwoReplicas:
    """A real engine as seen through a cluster backend: its replicas' own stats beside the summed ones."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def stats(self) -> dict[str, float]:
        return {"queue_depth": 3.0, "adapters_host": 2.0, "adapter_loads": 5.0, "adapter_hits": 7.0}

    def replica_stats(self) -> list[ReplicaStats]:
        return [
            ReplicaStats("r1", {"queue_depth": 1.0, "adapters_host": 2.0, "adapter_loads": 4.0,
                                "adapter_hits": 7.0},
                         {AdapterRouting.RESIDENT: 7, AdapterRouting.LOADED: 1}),
            ReplicaStats("r2", {"queue_depth": 2.0, "adapters_host": 0.0, "adapter_loads": 1.0,
                                "adapter_hits": 0.0}, {AdapterRouting.NONE: 4}),
            ReplicaStats("gone", {}, {AdapterRouting.LOADED: 2}),  # no longer polled: its counts stay
        ]


def _exposed(metrics: Metrics) -> dict[str, dict[Labels, float]]:
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_a_backend_with_replicas_gets_per_replica_series_beside_the_sums(tiny_backend: Any) -> None:
    metrics = Metrics()
    metrics.instrument({"@cf/cluster": _TwoReplicas(tiny_backend), "@cf/local": tiny_backend})
    seen = _exposed(metrics)
    cluster = {"model": "@cf/cluster"}
    # The summed series are the backend's stats(), as before.
    assert value(seen, "loraserve_queue_depth", **cluster) == 3
    assert value(seen, "loraserve_adapter_loads_total", **cluster) == 5
    for replica, queue, host, loads in (("r1", 1, 2, 4), ("r2", 2, 0, 1)):
        assert value(seen, "loraserve_replica_queue_depth", replica=replica, **cluster) == queue
        assert value(seen, "loraserve_replica_adapters_resident", replica=replica, tier="host",
                     **cluster) == host
        assert value(seen, "loraserve_replica_adapter_loads_total", replica=replica, **cluster) == loads
    assert value(seen, "loraserve_replica_adapter_hits_total", replica="r1", **cluster) == 7
    requests = seen["loraserve_replica_requests_total"]
    assert {dict(labels)["adapter"] for labels in requests} == {"none", "resident", "loaded"}
    assert value(seen, "loraserve_replica_requests_total", replica="r1", adapter="resident", **cluster) == 7
    assert value(seen, "loraserve_replica_requests_total", replica="r1", adapter="loaded", **cluster) == 1
    assert value(seen, "loraserve_replica_requests_total", replica="r2", adapter="none", **cluster) == 4
    assert value(seen, "loraserve_replica_requests_total", replica="gone", adapter="loaded", **cluster) == 2
    assert ("loraserve_replica_queue_depth", (("model", "@cf/cluster"), ("replica", "gone"))) not in [
        (name, labels) for name, series in seen.items() for labels in series]
    # A backend without replicas has no per-replica series at all.
    assert all(dict(labels)["model"] == "@cf/cluster"
               for name, series in seen.items() if name.startswith("loraserve_replica_") for labels in series)
    assert value(seen, "loraserve_queue_depth", model="@cf/local") == tiny_backend.stats()["queue_depth"]


def test_adapter_routing_of_a_started_request() -> None:
    assert [AdapterRouting.of(resident) for resident in (None, True, False)] == [
        AdapterRouting.NONE, AdapterRouting.RESIDENT, AdapterRouting.LOADED]

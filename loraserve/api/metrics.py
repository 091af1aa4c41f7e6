"""Prometheus metrics at GET /metrics: HTTP requests and errors by route and Workers AI code, tokens,
latency histograms, engine gauges (queue, KV blocks, adapters resident) and requests per adapter.

Each app has its own `CollectorRegistry` (several apps may live in one process: tests, benchmarks).
Generation is measured by wrapping each served `Backend` (`Metrics.instrument`), so every route
that generates (/run, the OpenAI face) is counted the same way without knowing about metrics.
The HTTP middleware and the endpoint are in metrics_http.py; per-replica series in metrics_replicas.py;
requests per finetune in metrics_adapters.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraserve.api.metrics_adapters import DEFAULT_ADAPTER_TOP_N, AdapterRequestCounter
from loraserve.api.metrics_replicas import replica_name, replicas_of, requests_family
from loraserve.types import (
    AdapterRef,
    Backend,
    ChatMessage,
    FinishReason,
    ModelInfo,
    SamplingParams,
    StreamEvent,
)

# Latency buckets: TTFT spans queueing (ms to tens of s); per-token time is ms to a second.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# backend.stats() key -> (metric name, help). Adapters resident are one family with a `tier` label.
_GAUGES = {
    "queue_depth": ("loraserve_queue_depth", "Requests waiting for a batch slot."),
    "running": ("loraserve_running_requests", "Requests in the running batch."),
    "kv_blocks_used": ("loraserve_kv_blocks_used", "Paged KV-cache blocks in use."),
    "kv_blocks_free": ("loraserve_kv_blocks_free", "Paged KV-cache blocks free."),
    "kv_blocks_cached": (
        "loraserve_kv_blocks_cached", "KV blocks holding a cached prompt prefix (in use or free)."
    ),
    "compute_threads": (
        "loraserve_compute_threads",
        "CPU threads the engine steps with now: fewer than configured while other work holds the cores.",
    ),
}
# backend.stats() key -> (counter name, help): totals since the engine started.
_COUNTERS = {
    "prefix_cache_hit_tokens": (
        "loraserve_prefix_cache_hit_tokens",
        "Prompt tokens whose K/V came from the prefix cache instead of being computed.",
    ),
    "adapter_loads": (
        "loraserve_adapter_loads", "LoRA adapters loaded from disk (host-memory cache misses).",
    ),
    "adapter_load_seconds": (
        "loraserve_adapter_load_seconds", "Seconds the adapter loader spent reading adapters from disk.",
    ),
    "adapter_hits": (
        "loraserve_adapter_hits", "Requests whose LoRA adapter was in memory already (no load from disk).",
    ),
    "request_retries": (
        "loraserve_request_retries",
        "Requests sent to another engine replica because theirs died before streaming anything (cluster).",
    ),
}
_ADAPTER_TIERS = {"adapters_device": "device", "adapters_host": "host", "adapters_pinned": "pinned"}


EngineFamily = GaugeMetricFamily | CounterMetricFamily


def _engine_families(rows: Iterable[tuple[list[str], Mapping[str, float]]], labels: list[str],
                     name: Callable[[str], str], resident_doc: str) -> list[EngineFamily]:
    """The engine's gauges, counters and adapters resident (by tier), one sample each per row of label
    values and the stats() they come from; `name` maps a series' name to the one these families take."""
    families: dict[str, EngineFamily] = {
        key: GaugeMetricFamily(name(metric), doc, labels=labels) for key, (metric, doc) in _GAUGES.items()}
    families.update({key: CounterMetricFamily(name(metric), doc, labels=labels)
                     for key, (metric, doc) in _COUNTERS.items()})
    resident = GaugeMetricFamily(name("loraserve_adapters_resident"), resident_doc, labels=[*labels, "tier"])
    for values, stats in rows:
        for key, family in families.items():
            if key in stats:
                family.add_metric(values, float(stats[key]))
        for key, tier in _ADAPTER_TIERS.items():
            if key in stats:
                resident.add_metric([*values, tier], float(stats[key]))
    return [*families.values(), resident]


def _summed_name(name: str) -> str:
    return name


class _EngineCollector(Collector):
    """Reads each backend's stats() at scrape time: gauges are always current, never stale."""

    def __init__(self, backends: Sequence[tuple[str, Backend]], adapters: AdapterRequestCounter) -> None:
        self._backends = backends
        self._adapters = adapters

    def collect(self) -> Iterable[Any]:
        yield from _engine_families((([label], backend.stats()) for label, backend in self._backends),
                                    ["model"], _summed_name,
                                    "LoRA adapters loaded, by cache tier (device, host, pinned).")
        # Per engine replica, for backends that have several (a cluster): the sums above stay as they are.
        # Only families with samples: a server without replicas shows none of them.
        replicas = replicas_of(self._backends)
        per_replica = _engine_families(
            (([model, replica.replica], replica.engine) for model, replica in replicas), ["model", "replica"],
            replica_name, "LoRA adapters loaded in each engine replica, by cache tier.")
        yield from (family for family in (*per_replica, requests_family(replicas)) if family.samples)
        requests = CounterMetricFamily(
            "loraserve_adapter_requests",
            "Generation requests per LoRA finetune id: the most requested have their own series, the rest "
            "are 'other'; 'none' is the base model.",
            labels=["adapter"],
        )
        for adapter, count in self._adapters.samples():
            requests.add_metric([adapter], float(count))
        yield requests


class Metrics:
    """The app's metrics. Build it before the app's context, then `instrument` the backends with it."""

    def __init__(self, adapter_top_n: int = DEFAULT_ADAPTER_TOP_N) -> None:
        # No "*_created" series beside every counter and histogram: noise for scrapers (process-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "loraserve_http_requests", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=r,
        )
        self.errors = Counter(
            "loraserve_http_errors", "HTTP error responses by route, status and Workers AI error code.",
            ["route", "status", "code"], registry=r,
        )
        self.duration = Histogram(
            "loraserve_http_request_duration_seconds", "Time to the end of the response, streams included.",
            ["route"], buckets=_DURATION_BUCKETS, registry=r,
        )
        # A refusal (429: 3040 capacity, 3036 rate limit) should cost microseconds; under overload its
        # tail is what a load balancer sees, measured here on the server's side of the socket.
        self.refusal_duration = Histogram(
            "loraserve_http_refusal_duration_seconds", "Time to answer a refused request (429).",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "loraserve_prompt_tokens", "Prompt tokens of generation requests.", ["model"], registry=r,
        )
        self.generation_tokens = Counter(
            "loraserve_generation_tokens", "Tokens generated.", ["model"], registry=r,
        )
        self.generations = Counter(
            "loraserve_generations", "Generations by how they ended: stop, length, error, or abort (the "
            "caller stopped reading first: a disconnect, a stop sequence, a timeout).",
            ["model", "finish_reason"], registry=r,
        )
        self.ttft = Histogram(
            "loraserve_time_to_first_token_seconds", "From queueing a request to its first generated token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "loraserve_time_per_output_token_seconds", "Mean time between output tokens of a request, "
            "after the first.", ["model"], buckets=_TPOT_BUCKETS, registry=r,
        )
        self.adapters = AdapterRequestCounter(adapter_top_n)
        self._instrumented: list[tuple[str, Backend]] = []
        self.registry.register(_EngineCollector(self._instrumented, self.adapters))

    def instrument(self, backends: Mapping[str, Backend]) -> dict[str, Backend]:
        """The same mapping with each distinct backend wrapped once; labelled by its first model id."""
        wrapped: dict[int, InstrumentedBackend] = {}
        out: dict[str, Backend] = {}
        for model_id, backend in backends.items():
            if id(backend) not in wrapped:
                wrapped[id(backend)] = InstrumentedBackend(backend, self, model_id)
                self._instrumented.append((model_id, backend))
            out[model_id] = wrapped[id(backend)]
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class InstrumentedBackend:
    """A Backend that measures what passes through `generate` and delegates everything else."""

    def __init__(self, inner: Backend, metrics: Metrics, label: str) -> None:
        self.inner = inner
        self._metrics = metrics
        self._label = label

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return self.inner.render_chat(messages)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        adapter: AdapterRef | None = None, cache_salt: str | None = None, session_id: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        started = time.perf_counter()
        # Called (not iterated) here, so that the engine's synchronous refusals (queue full) still raise now.
        events = self.inner.generate(request_id, prompt_token_ids, params, adapter, cache_salt, session_id)
        self._metrics.adapters.add(adapter.key if adapter is not None else None)
        return self._measured(events, started)

    async def _measured(
        self, events: AsyncIterator[StreamEvent], started: float
    ) -> AsyncIterator[StreamEvent]:
        m, label = self._metrics, self._label
        first_token_at: float | None = None
        last_token_at = started
        prompt_counted = finished = False
        generated = 0
        try:
            async for event in events:
                now = time.perf_counter()
                if not prompt_counted:
                    m.prompt_tokens.labels(label).inc(event.prompt_tokens)
                    prompt_counted = True
                if event.completion_tokens > generated:
                    m.generation_tokens.labels(label).inc(event.completion_tokens - generated)
                    if first_token_at is None:
                        first_token_at = now
                        m.ttft.labels(label).observe(now - started)
                    generated = event.completion_tokens
                    last_token_at = now
                if event.finish_reason is not None:
                    finished = True
                    m.generations.labels(label, event.finish_reason.value).inc()
                yield event
        finally:
            if not finished:  # abandoned before the engine finished: a disconnect, a stop sequence, a timeout
                m.generations.labels(label, FinishReason.ABORT.value).inc()
            if first_token_at is not None and generated > 1:
                m.tpot.labels(label).observe((last_token_at - first_token_at) / (generated - 1))
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def admit(self, prompt_tokens: int, max_tokens: int) -> None:
        self.inner.admit(prompt_tokens, max_tokens)

    def is_full(self) -> bool:
        return self.inner.is_full()

    def abort(self, request_id: str) -> None:
        self.inner.abort(request_id)

    def forget_adapter(self, key: str) -> None:
        self.inner.forget_adapter(key)

    def stats(self) -> dict[str, float]:
        return self.inner.stats()

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the Backend protocol (the engine's own attributes) is the inner backend's.
        return getattr(self.inner, name)

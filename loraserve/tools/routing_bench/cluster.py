"""The benchmark's application on a Ray started here: the loraserve Serve application (gateway and engine
replicas) behind Serve's HTTP proxy on loopback, deployed afresh for every routing so that every run
starts with cold adapter caches; and the adapter loads the gateway's /metrics sums over the replicas.
`local_serve` and `application` also start the cluster tests' applications (tests/cluster/)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraserve.api.settings import ServerSettings
from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.local import APP_NAME
from loraserve.registry.limits import RegistryLimits
from loraserve.tools.loadtest.server import free_port, metric_sum, parse_metrics

# Seconds between two polls of the replicas' gauges: /metrics is at most this much behind.
STATS_INTERVAL_S = 0.25
_LIMITS = RegistryLimits()
_BUSY = ("loraserve_running_requests", "loraserve_queue_depth")


@dataclass(frozen=True)
class Deployment:
    """What every application of one benchmark run shares; `config` makes one per routing."""

    model: str  # ID=SOURCE
    data_dir: Path
    replicas: int
    resident: int  # adapters per replica (Serve's multiplexing LRU; the engine's device slots)
    adapters: int  # finetunes the benchmark registers, all in one account
    max_batch: int
    engine_num_cpus: float

    def config(self, affinity: bool) -> ClusterConfig:
        return ClusterConfig(
            models=(self.model,), data_dir=self.data_dir, replicas=self.replicas,
            engine_num_cpus=self.engine_num_cpus, gateway_num_cpus=0.5, stats_interval_s=STATS_INTERVAL_S,
            # Serve's LRU evicting an adapter drops it from the engine's caches too (cluster/engine.py), so
            # a replica holds `resident` adapters under either routing: the engine's replica calls the
            # LRU for every finetune request, whether or not Serve routed by it.
            adapters_per_replica=self.resident, adapter_affinity=affinity,
            engine={"max_num_seqs": self.max_batch, "max_loras": self.resident},
            server=ServerSettings(rate_limit_per_minute=0),
            limits=dataclasses.replace(_LIMITS, max_finetunes_per_account=max(
                self.adapters, _LIMITS.max_finetunes_per_account)),
        )


@contextmanager
def local_serve(num_cpus: int) -> Iterator[str]:
    """Ray and Serve's proxy started here; yields the proxy's URL. Ray's start-up and shutdown warnings
    are not the benchmark's (and a test turns warnings into errors)."""
    import ray
    from ray import serve

    port = free_port()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()


@contextmanager
def application(config: ClusterConfig) -> Iterator[None]:
    """The application deployed (returns once every replica is up), deleted on exit with its replicas."""
    from ray import serve

    from loraserve.cluster.app import build

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serve.run(build(config), name=APP_NAME, route_prefix="/")
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serve.delete(APP_NAME)


@dataclass(frozen=True)
class Loads:
    """Adapter loads from disk since the application started, summed over its engine replicas."""

    loads: float
    seconds: float


def read_loads(http: httpx.Client, url: str, timeout_s: float = 20.0) -> Loads:
    """Once the engines are idle and the gateway's last poll saw every replica: two readings a few polls
    apart that agree (a counter read mid-poll, or from a poll a replica missed, would be short)."""
    deadline = time.monotonic() + timeout_s
    last: Loads | None = None
    while True:
        samples = parse_metrics(http.get(f"{url}/metrics").text)
        busy = sum(metric_sum(samples, name) for name in _BUSY)
        seen = sum(1 for name, _, _ in samples if name == "loraserve_adapter_loads_total")
        now = Loads(metric_sum(samples, "loraserve_adapter_loads_total"),
                    metric_sum(samples, "loraserve_adapter_load_seconds_total"))
        if not busy and seen and now == last:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engines' adapter loads did not settle within {timeout_s:g} s at {url}")
        last = None if busy else now
        time.sleep(3 * STATS_INTERVAL_S)

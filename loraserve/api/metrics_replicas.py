"""Per-replica series for a backend served by several engine replicas (a cluster), beside the summed ones.

They show whether adapter affinity works: each replica's own gauges and counters (adapters resident,
loads from disk, cache hits), and the requests each replica took by where their adapter was. A backend
opts in with `replica_stats()` (`PerReplica`); the API knows nothing else of how replicas are run.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from loraserve.types import Backend

# What a summed series is called per replica: loraserve_queue_depth -> loraserve_replica_queue_depth.
_PREFIX, _REPLICA_PREFIX = "loraserve_", "loraserve_replica_"


class AdapterRouting(enum.Enum):
    """Where a request's adapter was when the replica that took it got it."""

    NONE = "none"  # a base-model request
    RESIDENT = "resident"  # in the replica engine's memory already: affinity at work
    LOADED = "loaded"  # loaded from disk for it (or being loaded when it came)

    @classmethod
    def of(cls, adapter_resident: bool | None) -> AdapterRouting:
        if adapter_resident is None:
            return cls.NONE
        return cls.RESIDENT if adapter_resident else cls.LOADED


@dataclass(frozen=True)
class ReplicaStats:
    replica: str
    engine: Mapping[str, float]  # its engine's stats(); empty while it is not answering polls
    requests: Mapping[AdapterRouting, int] = field(default_factory=dict)  # started there, per routing


@runtime_checkable
class PerReplica(Protocol):
    """A backend that can tell its replicas apart."""

    def replica_stats(self) -> Sequence[ReplicaStats]: ...


def replica_families(backends: Iterable[tuple[str, Backend]], gauges: Mapping[str, tuple[str, str]],
                     counters: Mapping[str, tuple[str, str]],
                     tiers: Mapping[str, str]) -> Iterator[Metric]:
    """The per-replica twin of every gauge and counter (stats key -> (summed name, help)) and of the
    adapters-resident family (stats key -> tier), plus requests per replica and routing. Only families
    with samples: a server without replicas shows none of them."""
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        key: GaugeMetricFamily(_per_replica(name), doc, labels=["model", "replica"])
        for key, (name, doc) in gauges.items()}
    families.update({key: CounterMetricFamily(_per_replica(name), doc, labels=["model", "replica"])
                     for key, (name, doc) in counters.items()})
    resident = GaugeMetricFamily(
        "loraserve_replica_adapters_resident", "LoRA adapters loaded in each engine replica, by cache tier.",
        labels=["model", "replica", "tier"])
    requests = CounterMetricFamily(
        "loraserve_replica_requests",
        "Requests each engine replica started, by where their adapter was: none (base model), resident "
        "(in the replica's memory already) or loaded (loaded for it).",
        labels=["model", "replica", "adapter"])
    for model, backend in backends:
        if not isinstance(backend, PerReplica):
            continue
        for replica in backend.replica_stats():
            labels = [model, replica.replica]
            for key, family in families.items():
                if key in replica.engine:
                    family.add_metric(labels, float(replica.engine[key]))
            for key, tier in tiers.items():
                if key in replica.engine:
                    resident.add_metric([*labels, tier], float(replica.engine[key]))
            for routing in AdapterRouting:
                requests.add_metric([*labels, routing.value], float(replica.requests.get(routing, 0)))
    yield from (family for family in (*families.values(), resident, requests) if family.samples)


def _per_replica(name: str) -> str:
    return _REPLICA_PREFIX + name.removeprefix(_PREFIX)

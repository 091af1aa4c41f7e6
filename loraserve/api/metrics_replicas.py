"""Per-replica series for a backend served by several engine replicas (a cluster), beside the summed ones.

They show whether adapter affinity works: each replica's own gauges and counters (adapters resident,
loads from disk, cache hits), and the requests each replica took by where their adapter was. A backend
opts in with `replica_stats()` (`PerReplica`); the API knows nothing else of how replicas are run.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from prometheus_client.core import CounterMetricFamily

from loraserve.types import Backend

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


def replica_name(name: str) -> str:
    """What a summed series is called per replica: loraserve_queue_depth -> loraserve_replica_queue_depth."""
    return _REPLICA_PREFIX + name.removeprefix(_PREFIX)


def replicas_of(backends: Iterable[tuple[str, Backend]]) -> list[tuple[str, ReplicaStats]]:
    """(model, replica) for every replica of the backends that have several; none for the others."""
    return [(model, replica) for model, backend in backends if isinstance(backend, PerReplica)
            for replica in backend.replica_stats()]


def requests_family(replicas: Iterable[tuple[str, ReplicaStats]]) -> CounterMetricFamily:
    """Requests each replica started, by where their adapter was."""
    requests = CounterMetricFamily(
        "loraserve_replica_requests",
        "Requests each engine replica started, by where their adapter was: none (base model), resident "
        "(in the replica's memory already) or loaded (loaded for it).",
        labels=["model", "replica", "adapter"])
    for model, replica in replicas:
        for routing in AdapterRouting:
            requests.add_metric([model, replica.replica, routing.value],
                                float(replica.requests.get(routing, 0)))
    return requests

"""What an engine replica streams back for one request, besides the engine's own StreamEvents.

The first item of every stream says which replica took the request (or that it could not): the gateway
learns it before any token, so that even a refusal names the replica in the response header.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.types import StreamEvent


@dataclass(frozen=True)
class Started:
    """The replica queued the request in its engine; StreamEvents follow. `adapter_resident`: whether
    the request's adapter was in the engine's memory when the request arrived (False: it waits for a load
    from disk, its own or one under way); None for a base-model request."""

    replica: str
    adapter_resident: bool | None = None


@dataclass(frozen=True)
class Refused:
    """The replica could not take the request (its engine queue was full, or the adapter store did not
    answer): nothing was queued, nothing follows. The gateway answers 429 / 3040 with `reason` as the
    message when there is one (a store's outage names the store), Workers AI's own otherwise."""

    replica: str
    reason: str | None = None


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's gauges, as the gateway polls them (`EngineReplica.stats`)."""

    replica: str
    stats: dict[str, float]
    full: bool  # its engine would refuse a new request now


StreamItem = Started | Refused | StreamEvent

"""What an engine replica streams back for one request, besides the engine's own StreamEvents.

The first item of every stream says which replica took the request (or that it could not): the gateway
learns it before any token, so that even a refusal names the replica in the response header.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.types import StreamEvent


@dataclass(frozen=True)
class Started:
    """The replica queued the request in its engine; StreamEvents follow."""

    replica: str


@dataclass(frozen=True)
class Refused:
    """The replica's engine queue was full (QueueFull): nothing was queued, nothing follows."""

    replica: str


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's gauges, as the gateway polls them (`EngineReplica.stats`)."""

    replica: str
    stats: dict[str, float]
    full: bool  # its engine would refuse a new request now


StreamItem = Started | Refused | StreamEvent

"""Session affinity's ranking of engine replicas (router.py): the same on every machine, spread evenly over
the replicas, moving only the sessions of a replica that goes, and a full replica's sessions spread over
the others. The routing itself, on a real Serve application, is in test_cluster_serve.py."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'loraserve[cluster]'")
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from loraserve.cluster.engine import EngineReplica
from loraserve.cluster.router import SESSION_KWARG, rank, session_of

# Replica ids as Serve makes them (ReplicaID.unique_id: 8 random characters).
REPLICAS = ["k3v9xq2a", "p0m4tz7c", "b8wd1rne", "x5ly6uoh", "f2gj0sik"]
SESSIONS = [f"conversation-{i}" for i in range(2000)]


def first_choices(replicas: list[str]) -> dict[str, str]:
    return {session: rank(session, replicas)[0] for session in SESSIONS}


def test_the_ranking_is_the_same_in_every_process() -> None:
    # Pinned: Python's hash() of a str differs per process (PYTHONHASHSEED); these would then differ too.
    assert rank("conversation-7f3a", REPLICAS) == ["b8wd1rne", "x5ly6uoh", "p0m4tz7c", "f2gj0sik", "k3v9xq2a"]
    assert rank("user-1:chat-2", REPLICAS) == ["k3v9xq2a", "f2gj0sik", "p0m4tz7c", "b8wd1rne", "x5ly6uoh"]
    # The order replicas are listed in (each router has its own) does not matter.
    assert all(rank(session, REPLICAS) == rank(session, REPLICAS[::-1]) for session in SESSIONS[:100])
    assert rank("conversation-7f3a", []) == []


def test_sessions_spread_evenly_over_the_replicas() -> None:
    counts = Counter(first_choices(REPLICAS).values())
    share = len(SESSIONS) / len(REPLICAS)
    assert set(counts) == set(REPLICAS)
    assert all(0.85 * share < count < 1.15 * share for count in counts.values()), counts


def test_a_replica_that_goes_moves_only_its_own_sessions() -> None:
    before = first_choices(REPLICAS)
    gone = REPLICAS[2]
    after = first_choices([replica for replica in REPLICAS if replica != gone])
    moved = {session for session in SESSIONS if before[session] != after[session]}
    assert moved == {session for session in SESSIONS if before[session] == gone}
    # Each to its second choice: where it overflowed to while the replica was full.
    assert all(after[session] == rank(session, REPLICAS)[1] for session in moved)
    # A replica that starts takes sessions from every other one, and moves nothing else.
    grown = first_choices([*REPLICAS, "n7qe3wvd"])
    assert {grown[session] for session in SESSIONS if grown[session] != before[session]} == {"n7qe3wvd"}


def test_a_full_replicas_sessions_fall_back_over_all_the_others() -> None:
    for session in SESSIONS[:200]:
        order = rank(session, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)
        # Serve tries the ranks in turn: past a full first choice, the order is the one without it.
        assert order[1:] == rank(session, order[1:])
    # The sessions of one replica overflow to every other one, not all to a single neighbour (as on a ring).
    orders = [rank(session, REPLICAS) for session in SESSIONS]
    seconds = Counter(order[1] for order in orders if order[0] == REPLICAS[0])
    assert set(seconds) == set(REPLICAS[1:])
    assert min(seconds.values()) > 0.5 * max(seconds.values()), seconds


async def test_the_session_key_is_read_from_the_engine_call() -> None:
    def request(**kwargs: object) -> PendingRequest:
        return PendingRequest(args=["request-id", [1, 2, 3]], kwargs=kwargs,
                              metadata=RequestMetadata(request_id="r", internal_request_id="i"))

    assert session_of(request(**{SESSION_KWARG: "conversation-7f3a"})) == "conversation-7f3a"
    assert session_of(request(**{SESSION_KWARG: None})) is None
    assert session_of(request(**{SESSION_KWARG: ""})) is None
    assert session_of(request()) is None  # `info`, `stats`: no session
    assert session_of(None) is None
    # The gateway passes the key by this name; the engine's `generate` takes it by this name.
    assert SESSION_KWARG in inspect.signature(EngineReplica.generate).parameters

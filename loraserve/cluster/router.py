"""Session affinity for the engine deployment: the requests of one session (Workers AI's
`x-session-affinity`) go to one engine replica, where the session's growing prompt prefix is already in
the prefix cache.

The replica is chosen by rendezvous (highest-random-weight) hashing of the session key over the running
replicas, with a hash that is the same in every process: each gateway replica's router ranks them alike
with nothing shared, a replica that stops moves only its own sessions (each to its second choice), and one
that starts takes only the sessions it now ranks first. A replica that is full passes the request to the
session's next choice. Requests without a session are routed as Serve's default router routes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ray.serve._private.common import RequestMetadata
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

# The keyword argument of the engine's `generate` call that carries the session key: the gateway passes
# it by this name (backend.py), the router reads it from the request by this name.
SESSION_KWARG = "session_id"


def rank(session: str, replicas: Iterable[str]) -> list[str]:
    """`replicas` (their ids), best first for `session`. Each replica's place depends on the session and
    that replica alone, so removing one leaves the others' order unchanged."""
    return sorted(replicas, key=lambda replica: (_weight(session, replica), replica), reverse=True)


def _weight(session: str, replica: str) -> int:
    # Length-prefixed: no two (session, replica) pairs hash the same text.
    text = f"{len(session)}:{session}{replica}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def session_of(request: PendingRequest | None) -> str | None:
    """The request's session key; None for a request without one (or not an engine `generate` call)."""
    value = None if request is None else request.kwargs.get(SESSION_KWARG)
    return value if isinstance(value, str) and value else None


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's default router (power of two choices; a finetune's requests to the replicas that hold its
    adapter, FIFO), but for requests with a session key: those go to the session's replicas, in `rank`'s
    order, one rank at a time. Made in each process that holds a handle of the engine deployment."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session = session_of(pending_request)
        if session is None or pending_request is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        # Every rank full: Serve waits (backing off) before ranking again, rather than spinning.
        pending_request.routing_context.should_backoff = True
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica]] for replica in rank(session, by_id)]

    def _fulfill_next_pending_request(self, replica: RunningReplica,
                                      request_metadata: RequestMetadata | None = None) -> None:
        """Serve's FIFO order gives a replica found for one request to the oldest one waiting: a session's
        replica to another request, or another request's replica to a session. A request with a session
        takes only the replica found for it; others keep the FIFO order among themselves."""
        routed = self._get_pending_request_matching_internal_request_id(request_metadata)
        if routed is not None and session_of(routed) is not None:
            self._assign(routed, replica)
            return
        waiting = self._get_pending_request_matching_metadata(request_metadata)  # the same adapter
        if waiting is None or session_of(waiting) is not None:
            waiting = next((request for request in self._pending_requests_to_fulfill
                            if not request.future.done() and session_of(request) is None), None)
        if waiting is not None:
            self._assign(waiting, replica)

    def _assign(self, request: PendingRequest, replica: RunningReplica) -> None:
        """What Serve does for the request it gives a replica (RequestRouter, FIFOMixin)."""
        self._cancel_routing_task_for_pending_request(request)
        self._record_queue_wait_time(request)
        request.future.set_result(replica)
        # Left in `_pending_requests_to_fulfill`: Serve drops finished requests from there itself.
        self._remove_pending_request_from_indices(request)


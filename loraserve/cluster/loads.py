"""The engine replicas' gauges as a gateway sees them, polled in the background from every replica
(Serve's `broadcast`, which reaches busy replicas too: it bypasses their request limit).

Admission reads them: the deployment is full while every replica that answered the last poll said its
engine would refuse a new request. Requests beyond that are refused at once (3040) instead of waiting in
Serve's router for a slot; between two polls, Serve's own limits (`max_ongoing_requests`,
`max_queued_requests`) hold the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from loraserve.cluster.protocol import ReplicaLoad

logger = logging.getLogger("loraserve.cluster")

# Polls missed before a snapshot is no longer believed (the replicas may be gone, or busy answering).
_STALE_POLLS = 4


class ReplicaLoads:
    def __init__(self, handle: Any, interval_s: float) -> None:
        self._handle = handle  # a DeploymentHandle of EngineReplica
        self._interval_s = interval_s
        self._loads: list[ReplicaLoad] = []
        self._polled_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts polling on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="replica-loads")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _current(self) -> list[ReplicaLoad]:
        if time.monotonic() - self._polled_at > _STALE_POLLS * self._interval_s:
            return []
        return self._loads

    def full(self) -> bool:
        loads = self._current()
        return bool(loads) and all(load.full for load in loads)

    def replicas(self) -> list[ReplicaLoad]:
        """The replicas that answered the last poll, each with its own gauges."""
        return list(self._current())

    def stats(self) -> dict[str, float]:
        """Every gauge summed over the replicas that answered, and how many did (`replicas`)."""
        loads = self._current()
        total: dict[str, float] = {"replicas": float(len(loads))}
        for load in loads:
            for name, value in load.stats.items():
                total[name] = total.get(name, 0.0) + value
        return total

    async def poll(self) -> None:
        """One poll of every running replica; those that fail to answer in time are left out."""
        timeout = _STALE_POLLS * self._interval_s
        answers = await self._handle.broadcast("stats").results_async(timeout_s=timeout,
                                                                      return_exceptions=True)
        self._loads = [answer for answer in answers if isinstance(answer, ReplicaLoad)]
        self._polled_at = time.monotonic()

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:  # no replica yet, the controller restarting: the next poll may do
                logger.warning("polling the engine replicas' gauges failed: %r", exc)
            await asyncio.sleep(self._interval_s)

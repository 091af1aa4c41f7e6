"""One request's events as the gateway reads them from an engine replica, retried on another replica when
the first one dies before the request produced anything.

A replica that dies (kill -9, its node lost) under a request whose caller has seen no event yet costs that
caller nothing: the request is sent again through the handle, and Serve's router, told of the death by the
failed call, picks a live replica (a finetune's request loads its adapter there). Nothing was streamed, so
the caller cannot tell. Once an event has reached the caller the tokens cannot be taken back: the stream
ends with a LOST event, which the API answers as an error event ("try again", 3040).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

from loraserve.cluster.protocol import Refused, Started
from loraserve.cluster.replica_header import ServedBy
from loraserve.errors import CapacityExceeded
from loraserve.types import FinishReason, StreamEvent

if TYPE_CHECKING:
    from loraserve.cluster.backend import ClusterBackend

logger = logging.getLogger("loraserve.cluster")

# Replicas a request is sent to after the first one died under it: more than one death in a row points at
# the request (or the whole deployment) rather than at bad luck, and the caller is better told.
MAX_RETRIES = 2


def replica_died(exc: BaseException) -> bool:
    """The call failed because its replica's process went away, not because of the request: Ray's actor
    errors, also when they come wrapped in the task's error."""
    return isinstance(exc, RayActorError) or isinstance(getattr(exc, "cause", None), RayActorError)


class RemoteEvents:
    """One request's events from a replica. Closing it, or cancelling a read, before the last event
    cancels the Serve call, which aborts the engine request on the replica. Not an async generator: one
    closed before its first read would never run its cleanup.

    `send` makes the Serve call (a DeploymentResponseGenerator); it is called again for a retry.
    Serve's failures become what the API already answers: no replica can take the request (Serve's
    queue limit, or the replica's engine queue) is CapacityExceeded (429, 3040); a replica that failed
    under a started request ends it with a LOST event (the API's "try again")."""

    def __init__(self, backend: ClusterBackend, request_id: str, send: Callable[[], Any], num_prompt: int,
                 served: ServedBy | None) -> None:
        self._backend = backend
        self._request_id = request_id
        self._send = send
        self._response = send()
        self._num_prompt = num_prompt
        self._served = served
        self._completion_tokens = 0
        self.retries = 0
        self._streamed = False  # an event reached the caller: a retry would repeat or contradict it
        self._ended = False

    def __aiter__(self) -> RemoteEvents:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        try:
            event = await self._next_event()
        except BaseException:
            await self.aclose()
            raise
        self._streamed = True
        self._completion_tokens = event.completion_tokens
        if event.finish_reason is not None:
            self._end()
        return event

    async def _next_event(self) -> StreamEvent:
        while True:
            try:
                item = await anext(self._response)
            except StopAsyncIteration:
                if self._retry("the engine replica ended the stream before the request finished"):
                    continue
                return self._lost("the engine replica ended the stream before the request finished")
            except (BackPressureError, DeploymentUnavailableError):
                raise CapacityExceeded() from None
            except RequestCancelledError:
                return StreamEvent("", self._num_prompt, self._completion_tokens, FinishReason.ABORT)
            except RayError as exc:  # the replica died, or failed under the request
                if replica_died(exc) and self._retry(repr(exc)):
                    continue
                logger.error("engine replica failed under request %s: %r", self._request_id, exc)
                return self._lost(f"the engine replica failed: {type(exc).__name__}")
            if isinstance(item, Started | Refused):
                if self._served is not None:
                    self._served.replica = item.replica
                if isinstance(item, Refused):
                    raise CapacityExceeded() if item.reason is None else CapacityExceeded(item.reason)
                self._backend._started_on(item.replica, item.adapter_resident)
                continue
            if not isinstance(item, StreamEvent):
                raise TypeError(f"an engine replica streamed {type(item).__name__}, not a StreamEvent")
            # A replica shutting down (Serve stopping it) ends its queued requests LOST: as good as dead.
            if item.finish_reason is FinishReason.LOST and self._retry(item.error or "engine lost"):
                continue
            return item

    def _retry(self, why: str) -> bool:
        """Sends the request again when nothing reached the caller yet and retries are left."""
        if self._streamed or self.retries >= MAX_RETRIES:
            return False
        self.retries += 1
        logger.warning("engine replica lost request %s before its first event (%s): retry %d of %d",
                       self._request_id, why, self.retries, MAX_RETRIES)
        self._backend._retried()
        self._response = self._send()
        return True

    def _lost(self, message: str) -> StreamEvent:
        return StreamEvent("", self._num_prompt, self._completion_tokens, FinishReason.LOST, message)

    def cancel(self) -> None:
        if not self._ended:
            self._end()
            self._response.cancel()

    async def aclose(self) -> None:
        self.cancel()

    def _end(self) -> None:
        self._ended = True
        self._backend._closed(self._request_id)

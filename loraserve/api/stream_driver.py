"""Drives one prepared run for a route, whole or streamed: the deadline, the client going away, the first
event awaited before the 200, error events as API errors, and the run aborted however it ends.

Both faces (/run and the OpenAI routes) read a run through `Generation`; each supplies only its framing:
`collect` for a whole answer, `stream` for an event stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from loraserve.api.context import get_context
from loraserve.api.envelope import InternalError
from loraserve.api.generation import PreparedRun
from loraserve.api.sse import EventStreamResponse
from loraserve.api.usage import Usage, usage
from loraserve.errors import EngineLost, InvalidFinetune, RequestTimeout, WorkersAIError
from loraserve.types import FinishReason, StreamEvent

T = TypeVar("T")
logger = logging.getLogger("loraserve.api")


def event_error(run: PreparedRun, event: StreamEvent) -> WorkersAIError | None:
    """The API error for an event that reports a failure, if it does."""
    if event.finish_reason is FinishReason.LOST:
        logger.error("engine lost under request %s (%s): %s", run.request_id, run.model_id, event.error)
        return EngineLost()
    if event.finish_reason is not FinishReason.ERROR and event.error is None:
        return None
    if run.adapter is not None:
        # The one failure a caller can cause: an adapter that validated but would not load.
        return InvalidFinetune(f"Finetune {run.adapter.key} could not be loaded: {event.error}")
    logger.error("engine error on request %s (%s): %s", run.request_id, run.model_id, event.error)
    return InternalError()


class RunEvents:
    """A run's events as a route reads them. Iteration ends after the finishing event; an error event,
    or the deadline passing, raises its WorkersAIError instead. Closing it, or the iteration ending
    however it does, aborts the run and closes the engine's iterator at once.

    Not an async generator: one closed before its first read would never run its cleanup."""

    def __init__(self, run: PreparedRun, deadline: float | None) -> None:
        self.run = run
        self.last: StreamEvent | None = None  # the last event read: what the usage reports
        self._deadline = deadline
        self._events = run.events()  # the engine's refusals (a full queue: 3040) raise here
        self._peeked: StreamEvent | None = None
        self._ended = False

    def __aiter__(self) -> RunEvents:
        return self

    async def peek(self) -> None:
        """Reads the first event now (raising its error) and keeps it for the iteration."""
        self._peeked = await self._read()

    async def __anext__(self) -> StreamEvent:
        event, self._peeked = self._peeked, None
        if event is None and not self._ended:
            event = await self._read()
        if event is None:
            await self.aclose()
            raise StopAsyncIteration
        return event

    async def _read(self) -> StreamEvent | None:
        try:
            async with asyncio.timeout_at(self._deadline):
                event = await anext(self._events, None)
            if event is not None and (error := event_error(self.run, event)) is not None:
                raise error
        except TimeoutError:
            await self.aclose()
            raise RequestTimeout() from None
        except BaseException:
            await self.aclose()
            raise
        if event is None or event.finish_reason is not None:
            self._ended = True
        if event is not None:
            self.last = event
        return event

    def usage(self) -> Usage:
        prompt = self.last.prompt_tokens if self.last is not None else len(self.run.prompt_ids)
        completion = self.last.completion_tokens if self.last is not None else 0
        return usage(prompt, completion, self.last.cached_tokens if self.last is not None else 0)

    async def aclose(self) -> None:
        self._ended = True
        self._peeked = None
        self.run.abort()  # frees the KV blocks at once; a no-op after the run finished
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


class Generation:
    """One prepared run, driven for a route under the server's request timeout."""

    def __init__(self, request: Request, run: PreparedRun) -> None:
        self.request = request
        self.run = run
        timeout = get_context(request).settings.request_timeout_s
        self.deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self.headers = {"cf-ai-req-id": run.request_id}

    async def collect(self, consume: Callable[[RunEvents], Awaitable[T]]) -> T:
        """A whole answer: what `consume` builds from the run's events. Returning before they end
        aborts the run at once. Raises the run's error, RequestTimeout, or ClientDisconnect."""

        async def drive() -> T:
            async with aclosing(RunEvents(self.run, None)) as events:  # the deadline is on all of it
                return await consume(events)

        try:
            async with asyncio.timeout_at(self.deadline):
                return await unless_disconnected(drive(), self.request.receive)
        except TimeoutError:
            raise RequestTimeout() from None
        finally:
            self.run.abort()  # however this ended; a no-op after a normal finish

    async def stream(self, frames: Callable[[RunEvents], AsyncIterator[bytes]]) -> Response:
        """An event stream of `frames(events)`. The first event is awaited before the 200 goes out, so
        that a full queue (3040), a timeout or an adapter that fails to load is still an HTTP error;
        later failures are raised by `events` as WorkersAIErrors, for the frames to report. Frames that
        stop reading early (a stop sequence) close `events` to abort the run at once."""
        events = RunEvents(self.run, self.deadline)
        try:
            await unless_disconnected(events.peek(), self.request.receive)
        except BaseException:
            await events.aclose()
            raise
        return EventStreamResponse(frames(events), on_close=self.run.abort, headers=self.headers)


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """`work`'s result, or ClientDisconnect (answered 499) as soon as the client disconnects; the
    request body is read by now, so anything `receive` gives is the disconnect."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()

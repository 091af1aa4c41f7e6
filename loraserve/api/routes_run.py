"""POST /accounts/{account_id}/ai/run/{model}: one generation, whole or streamed (contract section 1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from loraserve.api.auth import Account
from loraserve.api.context import get_context
from loraserve.api.envelope import success
from loraserve.api.generation import PreparedRun, event_error, prepare, usage
from loraserve.api.openapi_models import input_schema, json_body, run_responses
from loraserve.api.schemas import parse_run_input
from loraserve.api.sse import DONE, EventStreamResponse, error_event, text_event, usage_event
from loraserve.api.validation import read_json_object
from loraserve.errors import RequestTimeout
from loraserve.types import StreamEvent

T = TypeVar("T")
router = APIRouter()


class ClientGone(Exception):
    """The caller disconnected before its answer was ready."""


@router.post("/run/{model:path}", openapi_extra=json_body(input_schema()), responses=run_responses())
async def run_model(request: Request, model: str, account: Account) -> Response:
    context = get_context(request)
    context.rate_limiter.check(account)
    inputs = parse_run_input(await read_json_object(request))
    run = await run_in_threadpool(prepare, context, account, model, inputs)
    timeout = context.settings.request_timeout_s
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    headers = {"cf-ai-req-id": run.request_id}
    try:
        if inputs.stream:
            return await _stream(request, run, deadline, headers)
        return await _complete(request, run, deadline, headers)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; uvicorn just needs a response


async def _complete(request: Request, run: PreparedRun, deadline: float | None, headers: dict[str, str]) -> Response:
    async def collect() -> tuple[str, StreamEvent | None]:
        parts: list[str] = []
        last = None
        async for event in run.events():
            error = event_error(run, event)
            if error is not None:
                raise error
            parts.append(event.text)
            last = event
        return "".join(parts), last

    try:
        async with asyncio.timeout_at(deadline):
            text, last = await unless_disconnected(collect(), request.receive)
    except TimeoutError:
        raise RequestTimeout() from None
    finally:
        run.abort()  # frees the KV blocks at once, however this ended; a no-op after a normal finish
    return JSONResponse(success({"response": text, "usage": usage(run, last)}), headers=headers)


async def first_event(request: Request, run: PreparedRun, events: AsyncIterator[StreamEvent],
                      deadline: float | None) -> StreamEvent | None:
    """A stream's first event, awaited before the 200 goes out, so that a full queue (3040), a timeout
    or an adapter that fails to load is still an HTTP error and not an event inside a 200."""
    try:
        async with asyncio.timeout_at(deadline):
            first = await unless_disconnected(anext(events, None), request.receive)
        if first is not None and (error := event_error(run, first)) is not None:
            raise error
    except TimeoutError:
        run.abort()
        raise RequestTimeout() from None
    except BaseException:
        run.abort()
        raise
    return first


async def _stream(request: Request, run: PreparedRun, deadline: float | None, headers: dict[str, str]) -> Response:
    events = run.events()
    first = await first_event(request, run, events, deadline)
    return EventStreamResponse(_sse(run, first, events, deadline), on_close=run.abort, headers=headers)


async def _sse(
    run: PreparedRun, first: StreamEvent | None, events: AsyncIterator[StreamEvent], deadline: float | None
) -> AsyncIterator[bytes]:
    event, last = first, None
    while event is not None:
        error = event_error(run, event)
        if error is not None:
            yield error_event(error)
            return
        if event.text:
            yield text_event(event.text)
        last = event
        if event.finish_reason is not None:
            break
        try:
            async with asyncio.timeout_at(deadline):
                event = await anext(events, None)
        except TimeoutError:
            yield error_event(RequestTimeout())
            return
    yield usage_event(usage(run, last))
    yield DONE


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """`work`'s result, or ClientGone as soon as the client disconnects (the body is read by now)."""

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
        raise ClientGone()
    return task.result()

"""POST /accounts/{account_id}/ai/run/{model}: one generation, whole or streamed (contract section 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from loraserve.api.auth import Account
from loraserve.api.context import get_context
from loraserve.api.envelope import success
from loraserve.api.generation import prepare
from loraserve.api.openapi_models import input_schema, json_body, run_responses
from loraserve.api.schemas import parse_run_input
from loraserve.api.session import session_affinity
from loraserve.api.sse import DONE, error_event, text_event, usage_event
from loraserve.api.stream_driver import Generation, RunEvents
from loraserve.api.validation import read_json_object
from loraserve.errors import WorkersAIError

router = APIRouter()


@router.post("/run/{model:path}", openapi_extra=json_body(input_schema()), responses=run_responses())
async def run_model(request: Request, model: str, account: Account) -> Response:
    context = get_context(request)
    await context.rate_limiter.check(account)
    inputs = parse_run_input(await read_json_object(request))
    run = await run_in_threadpool(prepare, context, account, model, inputs, session_affinity(request))
    generation = Generation(request, run)
    if inputs.stream:
        return await generation.stream(_sse)
    return JSONResponse(success(await generation.collect(_whole)), headers=generation.headers)


async def _whole(events: RunEvents) -> dict[str, Any]:
    text = "".join([event.text async for event in events])
    return {"response": text, "usage": events.usage()}


async def _sse(events: RunEvents) -> AsyncIterator[bytes]:
    try:
        async with aclosing(events):
            async for event in events:
                if event.text:
                    yield text_event(event.text)
    except WorkersAIError as error:  # after the 200: the error as an event, and the stream ends (no DONE)
        yield error_event(error)
        return
    yield usage_event(events.usage())
    yield DONE

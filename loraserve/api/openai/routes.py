"""The OpenAI-compatible face (contract section 5): /accounts/{account_id}/ai/v1/chat/completions,
/v1/completions and /v1/models, with the account's bearer token as the API key.

Requests are translated into /run inputs and go through the run endpoint's own pipeline (`prepare`:
templating, context check, model routing, adapter resolution), so both faces validate and generate
alike. A finetune is chosen with `lora` in the body or with `model: "<model>:<finetune name or id>"`.
Errors are the Workers AI errors, reshaped as OpenAI's `{"error": {...}}` by `OpenAIErrorMiddleware`
(errors.py); the request and response models are in schemas.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from loraserve.api.auth import Account
from loraserve.api.context import get_context
from loraserve.api.generation import PreparedRun, event_error, prepare, usage
from loraserve.api.openai.errors import openai_error
from loraserve.api.openai.schemas import (
    ChatCompletionRequest,
    ChatRole,
    ChatRunInput,
    CompletionRequest,
    CompletionRunInput,
    ModelEntry,
    ModelList,
    OpenAIFields,
    chat_responses,
    completion_responses,
)
from loraserve.api.openai.shapes import ResponseShape, StopMatcher, openai_finish_reason, sse_bytes
from loraserve.api.openapi_models import json_body, request_schema
from loraserve.api.routes_run import ClientGone, first_event, unless_disconnected
from loraserve.api.schemas import MAX_TEXT_CHARS, RunInput
from loraserve.api.sse import DONE, EventStreamResponse
from loraserve.api.validation import read_json_object, validate
from loraserve.errors import BadInput, NoSuchModel, RequestTimeout
from loraserve.types import StreamEvent

router = APIRouter(prefix="/v1")


def split_model(model: str, lora: str | None, served: Collection[str]) -> tuple[str, str | None]:
    """(model, finetune): `lora` from the body, or a "<model>:<finetune>" suffix on the model.

    Finetune names cannot hold ":" (registry rule), so the last ":" separates them; a served model
    id is never split.
    """
    if model in served or ":" not in model:
        return model, lora
    base, _, finetune = model.rpartition(":")
    if not base or not finetune:
        raise NoSuchModel(model)
    if lora is not None and lora != finetune:
        raise BadInput(f"lora: {lora!r} differs from the finetune named in model ({finetune!r})")
    return base, finetune


def _chat_input(body: ChatCompletionRequest, lora: str | None) -> RunInput:
    messages = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if len(text) > MAX_TEXT_CHARS:
            raise BadInput(f"messages.{i}.content: at most {MAX_TEXT_CHARS} characters")
        role = "system" if m.role is ChatRole.DEVELOPER else m.role.value
        messages.append({"role": role, "content": text})
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    data = {"messages": messages, "lora": lora, **body.sampling(max_tokens)}
    return validate(ChatRunInput, data)


def _completion_input(body: CompletionRequest, lora: str | None) -> RunInput:
    # OpenAI's completions continue the text as it is: a raw prompt, no chat template.
    data = {"prompt": body.prompt_text(), "raw": True, "lora": lora, **body.sampling(body.max_tokens)}
    return validate(CompletionRunInput, data)


# -- routes -----------------------------------------------------------------------------------------


@router.post("/chat/completions", openapi_extra=json_body(request_schema(ChatCompletionRequest)),
             responses=chat_responses())
async def chat_completions(request: Request, account: Account) -> Response:
    context = get_context(request)
    context.rate_limiter.check(account)
    body = validate(ChatCompletionRequest, await read_json_object(request))
    body.check_unsupported()
    model, lora = split_model(body.model, body.lora, context.backends.keys())
    return await _generate(request, account, body, model, _chat_input(body, lora), chat=True)


@router.post("/completions", openapi_extra=json_body(request_schema(CompletionRequest)),
             responses=completion_responses())
async def completions(request: Request, account: Account) -> Response:
    context = get_context(request)
    context.rate_limiter.check(account)
    body = validate(CompletionRequest, await read_json_object(request))
    body.check_unsupported()
    model, lora = split_model(body.model, body.lora, context.backends.keys())
    return await _generate(request, account, body, model, _completion_input(body, lora), chat=False)


@router.get("/models", responses={200: {"model": ModelList}})
async def list_models(request: Request, account: Account) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await _model_entries(request, account)})


@router.get("/models/{model:path}", responses={200: {"model": ModelEntry}})
async def retrieve_model(request: Request, model: str, account: Account) -> JSONResponse:
    for entry in await _model_entries(request, account):
        if entry["id"] == model:
            return JSONResponse(entry)
    raise NoSuchModel(model)


async def _model_entries(request: Request, account: str) -> list[dict[str, Any]]:
    """The served models, then the account's usable finetunes as "<model>:<finetune name>"."""
    context = get_context(request)
    started = int(time.time())
    entries: list[dict[str, Any]] = [
        {"id": model_id, "object": "model", "created": started, "owned_by": "loraserve"}
        for model_id in sorted(context.backends)
    ]
    finetunes = await run_in_threadpool(context.registry.list_finetunes, account)
    for finetune in finetunes:
        if finetune.ready and finetune.model in context.backends:
            entries.append({
                "id": f"{finetune.model}:{finetune.name}", "object": "model",
                "created": _epoch(finetune.created_at), "owned_by": account,
                "parent": finetune.model, "finetune_id": finetune.id,
            })
    return entries


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


async def _generate(
    request: Request, account: str, body: OpenAIFields, model: str, inputs: RunInput, chat: bool
) -> Response:
    context = get_context(request)
    run = await run_in_threadpool(prepare, context, account, model, inputs)
    timeout = context.settings.request_timeout_s
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    shape = ResponseShape(chat, run.request_id, body.model)
    headers = {"cf-ai-req-id": run.request_id}
    stops = StopMatcher(body.stop_strings())
    try:
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await _stream(request, run, deadline, shape, stops, include_usage, headers)
        return await _complete(request, run, deadline, shape, stops, headers)
    except ClientGone:
        return Response(status_code=499)


async def _close(events: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def _complete(
    request: Request, run: PreparedRun, deadline: float | None, shape: ResponseShape, stops: StopMatcher,
    headers: dict[str, str],
) -> Response:
    async def collect() -> tuple[str, str, StreamEvent | None]:
        parts: list[str] = []
        last: StreamEvent | None = None
        events = run.events()
        try:
            async for event in events:
                error = event_error(run, event)
                if error is not None:
                    raise error
                last = event
                parts.append(stops.feed(event.text))
                if stops.stopped:
                    return "".join(parts), "stop", last
                if event.finish_reason is not None:
                    break
        finally:
            await _close(events)
        parts.append(stops.flush())
        return "".join(parts), openai_finish_reason(last.finish_reason if last else None), last

    try:
        async with asyncio.timeout_at(deadline):
            text, finish, last = await unless_disconnected(collect(), request.receive)
    except TimeoutError:
        raise RequestTimeout() from None
    finally:
        run.abort()
    return JSONResponse(shape.completion(text, finish, usage(run, last)), headers=headers)


async def _stream(
    request: Request, run: PreparedRun, deadline: float | None, shape: ResponseShape, stops: StopMatcher,
    include_usage: bool, headers: dict[str, str],
) -> Response:
    events = run.events()
    first = await first_event(request, run, events, deadline)  # as /run: early failures stay HTTP errors
    chunks = _chunks(run, first, events, deadline, shape, stops, include_usage)
    return EventStreamResponse(chunks, on_close=run.abort, headers=headers)


async def _chunks(
    run: PreparedRun, first: StreamEvent | None, events: AsyncIterator[StreamEvent], deadline: float | None,
    shape: ResponseShape, stops: StopMatcher, include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
        payload = shape.chunk(text, finish, role)
        if include_usage:
            payload["usage"] = None  # as OpenAI sends it: null on every chunk but the last
        return sse_bytes(payload)

    try:
        if shape.chat:
            yield chunk("", role=True)
        event, last, finish = first, None, "stop"
        while event is not None:
            error = event_error(run, event)
            if error is not None:
                yield sse_bytes(openai_error(error))
                return
            last = event
            text = stops.feed(event.text)
            if text:
                yield chunk(text)
            if stops.stopped:
                run.abort()
                break
            if event.finish_reason is not None:
                finish = openai_finish_reason(event.finish_reason)
                break
            try:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events, None)
            except TimeoutError:
                yield sse_bytes(openai_error(RequestTimeout()))
                return
        if rest := stops.flush():
            yield chunk(rest)
        yield chunk(None if shape.chat else "", finish)
        if include_usage:
            yield sse_bytes(shape.usage_chunk(usage(run, last)))
        yield DONE
    finally:
        await _close(events)

"""The OpenAI-compatible face (contract section 5): /accounts/{account_id}/ai/v1/chat/completions,
/v1/completions and /v1/models, with the account's bearer token as the API key.

Requests are translated into /run inputs and go through the run endpoint's own pipeline (`prepare`:
templating, admission, model routing, adapter resolution; then `stream_driver.Generation`), so both
faces validate and generate alike; only the framing here is OpenAI's. A finetune is chosen with `lora`
in the body or with `model: "<model>:<finetune name or id>"`. Errors are the Workers AI errors,
reshaped as OpenAI's `{"error": {...}}` by `OpenAIErrorMiddleware` (errors.py); the request and
response models are in schemas.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Collection
from contextlib import aclosing
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from loraserve import catalog
from loraserve.api.auth import Account
from loraserve.api.context import get_context
from loraserve.api.generation import prepare
from loraserve.api.openai.errors import openai_error
from loraserve.api.openai.responses import ModelEntry, ModelList, chat_responses, completion_responses
from loraserve.api.openai.schemas import (
    ChatCompletionRequest,
    ChatRole,
    ChatRunInput,
    CompletionRequest,
    CompletionRunInput,
    OpenAIFields,
)
from loraserve.api.openai.shapes import ResponseShape, StopMatcher, openai_finish_reason, sse_bytes
from loraserve.api.openapi_models import json_body, request_schema
from loraserve.api.schemas import MAX_TEXT_CHARS, RunInput
from loraserve.api.session import session_affinity
from loraserve.api.sse import DONE
from loraserve.api.stream_driver import Generation, RunEvents
from loraserve.api.validation import read_json_object, validate
from loraserve.errors import BadInput, NoSuchModel, WorkersAIError
from loraserve.types import PositionLogprobs, StreamEvent

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
    data = {"messages": messages, "lora": lora, **body.sampling(max_tokens), **body.scoring()}
    return validate(ChatRunInput, data)


def _completion_input(body: CompletionRequest, lora: str | None) -> RunInput:
    # OpenAI's completions continue the text as it is: a raw prompt, no chat template.
    data = {"prompt": body.prompt_text(), "raw": True, "lora": lora, **body.sampling(body.max_tokens),
            **body.scoring()}
    return validate(CompletionRunInput, data)


# -- routes -----------------------------------------------------------------------------------------


@router.post("/chat/completions", openapi_extra=json_body(request_schema(ChatCompletionRequest)),
             responses=chat_responses())
async def chat_completions(request: Request, account: Account) -> Response:
    context = get_context(request)
    await context.rate_limiter.check(account)
    body = validate(ChatCompletionRequest, await read_json_object(request))
    body.check_unsupported()
    model, lora = split_model(body.model, body.lora, context.backends.keys())
    return await _generate(request, account, body, model, _chat_input(body, lora), chat=True)


@router.post("/completions", openapi_extra=json_body(request_schema(CompletionRequest)),
             responses=completion_responses())
async def completions(request: Request, account: Account) -> Response:
    context = get_context(request)
    await context.rate_limiter.check(account)
    body = validate(CompletionRequest, await read_json_object(request))
    body.check_unsupported()
    model, lora = split_model(body.model, body.lora, context.backends.keys())
    echo = body.prompt_text() if body.echo else ""
    return await _generate(request, account, body, model, _completion_input(body, lora), chat=False,
                           echo=echo)


@router.get("/models", responses={200: {"model": ModelList}})
async def list_models(request: Request, account: Account) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await _model_entries(request, account)})


@router.get("/models/{model:path}", responses={200: {"model": ModelEntry}})
async def retrieve_model(request: Request, model: str, account: Account) -> JSONResponse:
    for entry in await _model_entries(request, account):
        if entry["id"] == model:
            return JSONResponse(entry)
    raise NoSuchModel(model, catalog.how_to_serve(model))


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
    request: Request, account: str, body: OpenAIFields, model: str, inputs: RunInput, chat: bool,
    echo: str = "",
) -> Response:
    """`echo`: text the answer starts with (the prompt, for completions' echo)."""
    run = await run_in_threadpool(prepare, get_context(request), account, model, inputs,
                                  session_affinity(request))
    generation = Generation(request, run)
    shape = ResponseShape(chat, run.request_id, body.model, logprobs=bool(body.scoring()))
    stops = StopMatcher(body.stop_strings())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await generation.stream(lambda events: _chunks(events, shape, stops, include_usage, echo))

    async def whole(events: RunEvents) -> dict[str, Any]:
        parts = [echo]
        positions: list[PositionLogprobs] = []
        async for event in events:
            positions += _positions(event)
            parts.append(stops.feed(event.text))
            if stops.stopped:
                break  # returning closes `events`: the run is aborted at once
        parts.append(stops.flush())
        return shape.completion("".join(parts), _finish(stops, events.last), events.usage(), positions)

    return JSONResponse(await generation.collect(whole), headers=generation.headers)


def _positions(event: StreamEvent) -> list[PositionLogprobs]:
    """The logprobs an event brings, in the order of the text: the prompt's (the first event, when
    asked for), then the generated tokens'."""
    return [*(event.prompt_logprobs or ()), *event.logprobs]


def _finish(stops: StopMatcher, last: StreamEvent | None) -> str:
    return "stop" if stops.stopped else openai_finish_reason(last.finish_reason if last else None)


async def _chunks(
    events: RunEvents, shape: ResponseShape, stops: StopMatcher, include_usage: bool, echo: str
) -> AsyncIterator[bytes]:
    def chunk(text: str | None, finish: str | None = None, role: bool = False,
              positions: list[PositionLogprobs] | None = None) -> bytes:
        payload = shape.chunk(text, finish, role, positions)
        if include_usage:
            payload["usage"] = None  # as OpenAI sends it: null on every chunk but the last
        return sse_bytes(payload)

    if shape.chat:
        yield chunk("", role=True)
    try:
        async with aclosing(events):
            async for event in events:
                text, echo = echo + stops.feed(event.text), ""
                # A token's logprobs go out with the step that made it, even while its text is held back.
                positions = _positions(event)
                if text or positions:
                    yield chunk(text, positions=positions or None)
                if stops.stopped:
                    break  # leaving `aclosing` aborts the run at once
    except WorkersAIError as error:  # after the 200: the error as an event, and no [DONE]
        yield sse_bytes(openai_error(error))
        return
    if rest := stops.flush():
        yield chunk(rest)
    yield chunk(None if shape.chat else "", _finish(stops, events.last))
    if include_usage:
        yield sse_bytes(shape.usage_chunk(events.usage()))
    yield DONE

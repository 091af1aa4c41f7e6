"""The OpenAI-compatible routes' answers, for /openapi.json only: they describe the dicts
`shapes.ResponseShape` and `logprobs.py` build (the request bodies are in schemas.py)."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from loraserve.api.openapi_models import Out, PromptTokensDetails, event_stream


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# -- logprobs ----------------------------------------------------------------------------------------


class CompletionLogprobs(Out):
    """OpenAI's legacy shape: one entry per token (with echo, the prompt's first; its logprob is null).
    `top_logprobs` maps the most likely tokens and the chosen one to their logprobs. A token that is part
    of a UTF-8 character is spelled "bytes:\\xNN..."."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Out):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Out):
    content: list[ChatTokenLogprob]


# -- chat and completions ----------------------------------------------------------------------------


class AssistantMessage(Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChoice]
    usage: Usage


class ChunkDelta(Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Out):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(Out):
    """One event of a streamed chat completion; with `include_usage`, a last one with `choices: []`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class TextCompletionChunk(Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelEntry(Out):
    """A served model, or an account's ready finetune as "<model>:<finetune name>" (with its parent)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None
    finetune_id: str | None = None


class ModelList(Out):
    object: Literal["list"]
    data: list[ModelEntry]


class OpenAIErrorDetail(Out):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Out):
    """Every error on the /v1 routes (`OpenAIErrorMiddleware` reshapes the Workers AI envelope)."""

    error: OpenAIErrorDetail


@cache
def chat_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"model": ChatCompletion, "content": event_stream(ChatCompletionChunk, OpenAIError)}}


@cache
def completion_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"model": TextCompletion, "content": event_stream(TextCompletionChunk, OpenAIError)}}

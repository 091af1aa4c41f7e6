"""The OpenAI-compatible routes' bodies: the requests they validate with, the answers they give.

The request models are what `openai/routes.py` validates with; the response models only describe the
dicts `shapes.ResponseShape` builds, for /openapi.json.
"""

from __future__ import annotations

import enum
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from loraserve.api.openapi_models import Out, event_stream
from loraserve.api.schemas import (
    MAX_TEXT_CHARS,
    Flag,
    MessagesInput,
    OptionalNumber,
    OptionalWhole,
    PromptInput,
    within,
)
from loraserve.errors import BadInput
from loraserve.types import (
    MAX_TOKENS,
    OPENAI_SEED,
    PENALTY,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_P,
    WORKERS_AI_TOP_K,
)

MAX_STOP_SEQUENCES = 4
_PROMPT: JsonDict = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS}


# -- request bodies ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Flag = False


class OpenAIFields(BaseModel):
    """What chat and completions share. A sampling field left out takes the Workers AI default."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    lora: str | None = Field(default=None, min_length=1)
    stream: Flag = False
    stream_options: StreamOptions | None = None
    max_tokens: OptionalWhole = within(MAX_TOKENS)
    temperature: OptionalNumber = within(TEMPERATURE)
    top_p: OptionalNumber = within(TOP_P)
    top_k: OptionalWhole = within(WORKERS_AI_TOP_K)  # beyond OpenAI, as vLLM takes them
    repetition_penalty: OptionalNumber = within(REPETITION_PENALTY)
    seed: OptionalWhole = within(OPENAI_SEED)
    frequency_penalty: OptionalNumber = within(PENALTY)
    presence_penalty: OptionalNumber = within(PENALTY)
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_SEQUENCES},
        {"type": "null"}]})
    n: OptionalWhole = Field(default=None, ge=1, le=1, description="only 1 is supported")
    # Accepted so that clients which always send them work; anything that asks for logprobs is refused.
    logprobs: Any = Field(default=None, json_schema_extra={"enum": [False, None]})
    top_logprobs: OptionalWhole = Field(default=None, json_schema_extra={"enum": [0, None]})

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise BadInput(f"stop: at most {MAX_STOP_SEQUENCES} sequences")
        return [s for s in stops if s]

    def check_unsupported(self) -> None:
        if not (self.logprobs is None or self.logprobs is False) or self.top_logprobs not in (None, 0):
            raise BadInput("logprobs: not supported by this server")

    def sampling(self, max_tokens: int | None) -> dict[str, Any]:
        fields = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                  "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty}
        return {k: v for k, v in fields.items() if v is not None}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatRole(enum.StrEnum):
    SYSTEM = "system"
    DEVELOPER = "developer"  # OpenAI's newer name for the system message
    USER = "user"
    ASSISTANT = "assistant"


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: ChatRole
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: OptionalWhole = within(MAX_TOKENS)
    tools: list[Any] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "array", "maxItems": 0}, {"type": "null"}]})
    response_format: dict[str, Any] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}}, {"type": "null"}]})

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise BadInput("tools: tool calling is not supported by this server")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise BadInput("response_format: only {\"type\": \"text\"} is supported")


class CompletionRequest(OpenAIFields):
    # One prompt, as /run takes it (CompletionRunInput checks it), or a list of just that one.
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        _PROMPT, {"type": "array", "items": _PROMPT, "minItems": 1, "maxItems": 1}]})
    echo: Flag = Field(default=False, json_schema_extra={"const": False})
    suffix: str | None = Field(default=None, json_schema_extra={"anyOf": [{"const": ""}, {"type": "null"}]})
    best_of: OptionalWhole = Field(default=None, ge=1, le=1, description="only 1 is supported")

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise BadInput("echo: not supported by this server")
        if self.suffix:
            raise BadInput("suffix: not supported by this server")

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise BadInput("prompt: give one prompt (a string, or a list of one string)")
        return self.prompt[0]


# The /run input shapes, with OpenAI's wider ranges for what OpenAI allows beyond Workers AI.
class ChatRunInput(MessagesInput):
    seed: int | None = within(OPENAI_SEED)
    frequency_penalty: float | None = within(PENALTY)
    presence_penalty: float | None = within(PENALTY)


class CompletionRunInput(PromptInput):
    seed: int | None = within(OPENAI_SEED)
    frequency_penalty: float | None = within(PENALTY)
    presence_penalty: float | None = within(PENALTY)


# -- responses (documentation only) ------------------------------------------------------------------


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(Out):
    index: int
    message: AssistantMessage
    logprobs: None
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
    logprobs: None
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
    logprobs: None
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
    logprobs: None
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

"""Request bodies (contract sections 1 and 3). Unknown fields are ignored, as the public service does."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, WithJsonSchema
from pydantic.config import JsonDict

from loraserve.api.validation import validate
from loraserve.errors import BadInput
from loraserve.registry.names import MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS
from loraserve.types import (
    MAX_TOKENS,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_P,
    WORKERS_AI_PENALTY,
    WORKERS_AI_SEED,
    WORKERS_AI_TOP_K,
    ChatMessage,
    Limit,
    SamplingParams,
)

MAX_TEXT_CHARS = 131072


def _json_bool(value: Any) -> Any:
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


def _json_int(value: Any) -> Any:
    # JSON has one number type: 5.0 is the integer 5 (JSON Schema's "integer" says so too), 5.5 is not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON's own types, as the published schemas say: no "5" for 5, no 0 or "yes" for false, no true for 1.
# Two leniencies, because real clients need them: the docs' own curl sends `"raw": "true"`, and the
# SDK may send 5.0 for 5.
Flag = Annotated[bool, BeforeValidator(_json_bool), Strict(),
                 WithJsonSchema({"anyOf": [{"type": "boolean"}, {"enum": ["true", "false"]}]})]
# Optional numbers (every numeric field here is). The validator wraps the whole union so that bounds
# given with Field(ge=...) reach the integer's JSON Schema as "minimum" (not pydantic's raw "ge").
OptionalWhole = Annotated[Annotated[int, Strict()] | None, BeforeValidator(_json_int)]
OptionalNumber = Annotated[float, Strict()] | None  # an integer is a number too


def within(limit: Limit) -> Any:
    """An optional sampling field bounded by `limit`, declared once in loraserve.types."""
    return Field(default=None, ge=limit.ge, le=limit.le)


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: str = Field(max_length=MAX_TEXT_CHARS)

    def to_chat(self) -> ChatMessage:
        return ChatMessage(role=self.role.value, content=self.content)


class _RunFields(BaseModel):
    """What both input shapes share. A sampling field left out takes SamplingParams' default."""

    model_config = ConfigDict(extra="ignore")

    stream: Flag = False
    lora: str | None = Field(default=None, min_length=1)
    max_tokens: OptionalWhole = within(MAX_TOKENS)
    temperature: OptionalNumber = within(TEMPERATURE)
    top_p: OptionalNumber = within(TOP_P)
    top_k: OptionalWhole = within(WORKERS_AI_TOP_K)
    seed: OptionalWhole = within(WORKERS_AI_SEED)
    repetition_penalty: OptionalNumber = within(REPETITION_PENALTY)
    frequency_penalty: OptionalNumber = within(WORKERS_AI_PENALTY)
    presence_penalty: OptionalNumber = within(WORKERS_AI_PENALTY)

    def sampling_params(self) -> SamplingParams:
        given = {
            name: getattr(self, name)
            for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
                         "frequency_penalty", "presence_penalty")
            if getattr(self, name) is not None
        }
        return SamplingParams(**given)


class PromptInput(_RunFields):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    raw: Flag = False


class MessagesInput(_RunFields):
    messages: list[Message] = Field(min_length=1)

    def chat(self) -> list[ChatMessage]:
        return [m.to_chat() for m in self.messages]


RunInput = PromptInput | MessagesInput


def parse_run_input(data: dict[str, Any]) -> RunInput:
    """One of the two shapes; both or neither is a schema error (5006)."""
    has_prompt, has_messages = "prompt" in data, "messages" in data
    if has_prompt and has_messages:
        raise BadInput("prompt, messages: give either prompt or messages, not both")
    if has_prompt:
        return validate(PromptInput, data)
    if has_messages:
        return validate(MessagesInput, data)
    raise BadInput("prompt, messages: one of them is required")


# The registry checks names (registry/names.py); the schema says the same, for clients and fuzzers.
_NAME_SCHEMA: JsonDict = {
    "maxLength": MAX_NAME_CHARS,
    "pattern": "^[A-Za-z0-9._-]+$",
    "not": {"anyOf": [
        {"pattern": "^[.]+$"},  # only dots: a path segment
        {"pattern": "^[cC][fF]-[pP][uU][bB][lL][iI][cC]-"},  # reserved
        # reads as a UUID, i.e. an id, to Python's uuid.UUID (hyphens anywhere, "0x", "_" between digits)
        {"pattern": "^(?=(?:-*[0-9a-fA-FxX_]){32}-*$)"
                    "-*(?:0-*[xX]-*(?:_-*)?)?[0-9a-fA-F](?:-*_?-*[0-9a-fA-F])*-*$"},
    ]},
}


class FinetuneCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    name: str = Field(min_length=1, json_schema_extra=_NAME_SCHEMA)
    description: str | None = Field(default="", json_schema_extra={"anyOf": [
        {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS}, {"type": "null"}]})
    public: Flag = False

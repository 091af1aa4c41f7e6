"""Request bodies (contract sections 1 and 3). Unknown fields are ignored, as the public service does."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loraserve.api.validation import validate
from loraserve.errors import BadInput
from loraserve.types import ChatMessage, SamplingParams

MAX_TEXT_CHARS = 131072


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

    # Lax mode on purpose: the docs' own curl sends `"raw": "true"`, and the SDK may send 5.0 for 5.
    model_config = ConfigDict(extra="ignore")

    stream: bool = False
    lora: str | None = Field(default=None, min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=5)
    top_p: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=1, le=50)
    seed: int | None = Field(default=None, ge=1, le=9_999_999_999)
    repetition_penalty: float | None = Field(default=None, ge=0, le=2)
    frequency_penalty: float | None = Field(default=None, ge=0, le=2)
    presence_penalty: float | None = Field(default=None, ge=0, le=2)

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
    raw: bool = False


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


class FinetuneCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    name: str = Field(min_length=1)
    description: str | None = ""
    public: bool = False

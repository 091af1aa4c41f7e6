"""The OpenAI-compatible routes' request bodies: what `openai/routes.py` validates with (the answers are
described in responses.py).
"""

from __future__ import annotations

import enum
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

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
    OPENAI_CHAT_TOP_LOGPROBS,
    OPENAI_COMPLETION_LOGPROBS,
    OPENAI_COMPLETION_MAX_TOKENS,
    OPENAI_SEED,
    PENALTY,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_P,
    WORKERS_AI_TOP_K,
    SamplingParams,
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

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise BadInput(f"stop: at most {MAX_STOP_SEQUENCES} sequences")
        return [s for s in stops if s]

    def check_unsupported(self) -> None:
        """Refuses what the schema cannot say (a 400, never silently ignored)."""

    def scoring(self) -> dict[str, int]:
        """The logprobs fields of the run input (ChatRunInput, CompletionRunInput) the request asks for."""
        return {}

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
    logprobs: Flag | None = Field(default=None, description="the generated tokens' log-probabilities")
    top_logprobs: OptionalWhole = Field(default=None, ge=OPENAI_CHAT_TOP_LOGPROBS.ge,
                                        le=OPENAI_CHAT_TOP_LOGPROBS.le,
                                        description="the most likely alternatives at each position; "
                                                    "needs logprobs")
    tools: list[Any] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "array", "maxItems": 0}, {"type": "null"}]})
    response_format: dict[str, Any] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}}, {"type": "null"}]})

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:  # 0 is accepted: some clients always send it
            raise BadInput("top_logprobs: needs logprobs: true")
        if self.tools:
            raise BadInput("tools: tool calling is not supported by this server")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise BadInput("response_format: only {\"type\": \"text\"} is supported")

    def scoring(self) -> dict[str, int]:
        return {"logprobs": self.top_logprobs or 0} if self.logprobs else {}


class CompletionRequest(OpenAIFields):
    # One prompt, as /run takes it (CompletionRunInput checks it), or a list of just that one.
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        _PROMPT, {"type": "array", "items": _PROMPT, "minItems": 1, "maxItems": 1}]})
    # 0 generates nothing: with echo and logprobs, the prompt is scored (a perplexity).
    max_tokens: OptionalWhole = within(OPENAI_COMPLETION_MAX_TOKENS)
    logprobs: OptionalWhole = Field(default=None, ge=OPENAI_COMPLETION_LOGPROBS.ge,
                                    le=OPENAI_COMPLETION_LOGPROBS.le,
                                    description="each token's log-probability and this many alternatives")
    echo: Flag = Field(default=False, description="the prompt first in the text (and in the logprobs)")
    suffix: str | None = Field(default=None, json_schema_extra={"anyOf": [{"const": ""}, {"type": "null"}]})
    best_of: OptionalWhole = Field(default=None, ge=1, le=1, description="only 1 is supported")

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise BadInput("suffix: not supported by this server")

    def scoring(self) -> dict[str, int]:
        if self.logprobs is None:
            return {}
        return {"logprobs": self.logprobs, **({"prompt_logprobs": self.logprobs} if self.echo else {})}

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise BadInput("prompt: give one prompt (a string, or a list of one string)")
        return self.prompt[0]


# The /run input shapes, with OpenAI's wider ranges for what OpenAI allows beyond Workers AI, and the
# logprobs /run does not have (the routes fill them from `scoring()`, already bounded).
class ChatRunInput(MessagesInput):
    seed: int | None = within(OPENAI_SEED)
    frequency_penalty: float | None = within(PENALTY)
    presence_penalty: float | None = within(PENALTY)
    logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
        return replace(super().sampling_params(), logprobs=self.logprobs)


class CompletionRunInput(PromptInput):
    seed: int | None = within(OPENAI_SEED)
    frequency_penalty: float | None = within(PENALTY)
    presence_penalty: float | None = within(PENALTY)
    max_tokens: int | None = within(OPENAI_COMPLETION_MAX_TOKENS)
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
        return replace(super().sampling_params(), logprobs=self.logprobs,
                       prompt_logprobs=self.prompt_logprobs)



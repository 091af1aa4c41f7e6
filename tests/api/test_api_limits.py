"""The sampling ranges (declared once, in loraserve.types) and the engine's refusals as API errors."""

from __future__ import annotations

import re
from typing import Any

import pytest

from loraserve.api.generation import engine_refusals
from loraserve.api.openai.schemas import (
    ChatCompletionRequest,
    ChatRunInput,
    CompletionRequest,
    CompletionRunInput,
)
from loraserve.api.schemas import MessagesInput, PromptInput
from loraserve.errors import CapacityExceeded, ContextWindowExceeded
from loraserve.types import (
    ENGINE_MAX_TOKENS,
    LOGPROBS,
    MAX_TOKENS,
    OPENAI_CHAT_TOP_LOGPROBS,
    OPENAI_COMPLETION_LOGPROBS,
    OPENAI_COMPLETION_MAX_TOKENS,
    PENALTY,
    REPETITION_PENALTY,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    WORKERS_AI_PENALTY,
    Limit,
    PromptTooLong,
    QueueFull,
    SamplingParams,
)

# What SamplingParams accepts of each field the bodies take (the seed: any integer).
ENGINE_RANGES = {"max_tokens": ENGINE_MAX_TOKENS, "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": TOP_K,
                 "seed": Limit(), "repetition_penalty": REPETITION_PENALTY, "frequency_penalty": PENALTY,
                 "presence_penalty": PENALTY}


def test_engine_refusals_become_the_api_errors() -> None:
    with pytest.raises(CapacityExceeded), engine_refusals():
        raise QueueFull()
    with pytest.raises(ContextWindowExceeded) as refused, engine_refusals():
        raise PromptTooLong(10, 5, 12)
    assert refused.value.message == ("The estimated number of input and maximum output tokens (15) exceeded "
                                     "this model context window limit (12)")


def test_sampling_params_check_the_engine_ranges() -> None:
    SamplingParams(top_k=0, frequency_penalty=-2, presence_penalty=2)  # "no cut", and OpenAI's penalties
    refused: list[tuple[dict[str, Any], str]] = [
        ({"max_tokens": -1}, "max_tokens must be >= 0"),
        ({"temperature": 5.5}, "temperature must be in [0, 5]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"presence_penalty": -2.5}, "presence_penalty must be in [-2, 2]"),
    ]
    for given, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            SamplingParams(**given)


def _bounds(model: Any, name: str) -> Limit:
    low = high = None
    for item in model.model_fields[name].metadata:
        low = getattr(item, "ge", low)
        high = getattr(item, "le", high)
    return Limit(low, high)


def _within(inner: Limit, outer: Limit) -> bool:
    low_ok = outer.ge is None or (inner.ge is not None and inner.ge >= outer.ge)
    high_ok = outer.le is None or (inner.le is not None and inner.le <= outer.le)
    return low_ok and high_ok


def test_the_api_ranges_lie_within_the_engines() -> None:
    """Whatever a body may say validates as SamplingParams too: no request fails after its schema passed."""
    for model in (PromptInput, MessagesInput, ChatRunInput, CompletionRunInput, ChatCompletionRequest):
        for name, engine in ENGINE_RANGES.items():
            assert _within(_bounds(model, name), engine), (model.__name__, name)
    # /run keeps Workers AI's narrower penalties; the OpenAI face takes OpenAI's.
    assert _bounds(PromptInput, "frequency_penalty") == WORKERS_AI_PENALTY
    assert _bounds(ChatRunInput, "frequency_penalty") == PENALTY
    assert _bounds(ChatCompletionRequest, "presence_penalty") == PENALTY
    # /run generates at least one token; OpenAI's completions take 0 (echo: score the prompt only).
    assert _bounds(PromptInput, "max_tokens") == _bounds(ChatCompletionRequest, "max_tokens") == MAX_TOKENS
    assert _bounds(CompletionRunInput, "max_tokens") == OPENAI_COMPLETION_MAX_TOKENS
    # The alternatives asked for per position: OpenAI's bounds, within the engine's.
    assert _bounds(CompletionRequest, "logprobs") == OPENAI_COMPLETION_LOGPROBS
    assert _bounds(ChatCompletionRequest, "top_logprobs") == OPENAI_CHAT_TOP_LOGPROBS
    assert _within(OPENAI_COMPLETION_LOGPROBS, LOGPROBS) and _within(OPENAI_CHAT_TOP_LOGPROBS, LOGPROBS)

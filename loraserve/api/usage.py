"""The `usage` object of every generation, the same on both faces (/run's result and last event, the OpenAI
routes' answers and last chunk): OpenAI's shape, which Workers AI reports too, with the prompt tokens served
from the prefix cache as `prompt_tokens_details.cached_tokens` (0 when none were)."""

from __future__ import annotations

from typing import TypedDict


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }

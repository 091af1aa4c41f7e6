"""The benchmark's clients: a fixed sequence of streamed /run requests, each naming a finetune, sent over
HTTP to Serve's proxy by `concurrency` workers (a closed loop: each sends its next request when the last
one ended). TTFT is measured here, from sending a request to its first SSE event."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

# Seconds a request may take, queueing included, before it counts as failed.
_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


@dataclass(frozen=True)
class BenchRequest:
    finetune: str  # a finetune's name in the account
    prompt: str


@dataclass
class PhaseResult:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "status code" -> requests
    ttft_s: list[float] = field(default_factory=list)  # requests that streamed a first event
    tokens: int = 0  # completion tokens, as the last event's usage says
    wall_s: float = 0.0


def drive(run_url: str, token: str, requests: list[BenchRequest], max_tokens: int,
          concurrency: int) -> PhaseResult:
    return asyncio.run(_drive(run_url, token, requests, max_tokens, concurrency))


async def _drive(run_url: str, token: str, requests: list[BenchRequest], max_tokens: int,
                 concurrency: int) -> PhaseResult:
    result = PhaseResult(requests=len(requests))
    todo = iter(requests)  # shared by the workers: each takes the next request when free
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=_TIMEOUT, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as http:

        async def worker() -> None:
            for request in todo:
                await _one(http, run_url, request, max_tokens, result)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        result.wall_s = time.perf_counter() - started
    return result


async def _one(http: httpx.AsyncClient, run_url: str, request: BenchRequest, max_tokens: int,
               result: PhaseResult) -> None:
    body = {"prompt": request.prompt, "lora": request.finetune, "max_tokens": max_tokens, "stream": True}
    sent = time.perf_counter()
    first: float | None = None
    usage: dict[str, int] = {}
    try:
        async with http.stream("POST", run_url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                _count(result, f"{response.status_code} {_code(response.text)}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if first is None:
                    first = time.perf_counter()
                event = json.loads(line.removeprefix("data: "))
                usage = event.get("usage") or usage
    except httpx.HTTPError as exc:
        _count(result, type(exc).__name__)
        return
    if first is None:
        _count(result, "no event")
        return
    result.ttft_s.append(first - sent)
    result.tokens += int(usage.get("completion_tokens", 0))


def _count(result: PhaseResult, error: str) -> None:
    result.errors[error] = result.errors.get(error, 0) + 1


def _code(text: str) -> str:
    """The Workers AI error code of a refusal's envelope, or '' for another body."""
    try:
        errors = json.loads(text).get("errors") or [{}]
        return str(errors[0].get("code", ""))
    except (ValueError, AttributeError):
        return ""

"""The client side of `loraserve loadtest`: closed-loop streaming clients that hang up at random,
and the tally of what they saw. No torch: the clients should take as little of the machine as they can."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from loraserve.tools.loadtest.server import model_id

if TYPE_CHECKING:
    from loraserve.tools.loadtest.run import Options

PROMPTS = (
    "tell me a story",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish, French and German.",
    "Summarise the plot of Hamlet for a ten year old, in a friendly tone, and end with a question.",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "hi",
)
CUT_EVENTS = 24  # a hang-up comes after 0..CUT_EVENTS events (0: before the first one, still queued)


@dataclass
class Tally:
    started: int = 0
    completed: int = 0  # read to [DONE]
    disconnected: int = 0  # hung up on purpose: after some events, or while queued
    cut_at_end: int = 0  # still running when the time was up
    responses: Counter[str] = field(default_factory=Counter)  # "200", "429 3040", ...
    stream_errors: Counter[str] = field(default_factory=Counter)  # error events inside a 200, by code
    transport_errors: Counter[str] = field(default_factory=Counter)  # by exception type
    truncated: int = 0  # a 200 stream that ended without [DONE] or an error event
    hangs: int = 0  # nothing read for read_timeout_s
    tokens: int = 0  # completion tokens received
    ttft_s: list[float] = field(default_factory=list)
    refusal_s: list[float] = field(default_factory=list)  # time to a 429


def _error_code(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        return str(data["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "?"


class LoadClients:
    def __init__(self, opts: Options, url: str, token: str, finetunes: list[str]) -> None:
        self.opts = opts
        self.run_url = f"{url}/client/v4/accounts/{opts.account}/ai/run/{model_id(opts.model)}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.finetunes = finetunes
        self.tally = Tally()

    def body(self, rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": rng.choice(PROMPTS),
            "max_tokens": rng.choice(self.opts.max_tokens),
            "temperature": round(rng.uniform(0.0, 1.0), 2),
            "seed": rng.randrange(1 << 30),
            "stream": True,
        }
        if self.finetunes and rng.random() < self.opts.lora_p:
            body["lora"] = rng.choice(self.finetunes)
        return body

    async def run(self, duration_s: float) -> None:
        opts = self.opts
        limits = httpx.Limits(max_connections=opts.clients + 8, max_keepalive_connections=opts.clients + 8)
        timeout = httpx.Timeout(30.0, read=opts.read_timeout_s)
        async with httpx.AsyncClient(headers=self.headers, limits=limits, timeout=timeout) as http:
            tasks = [asyncio.create_task(self._client(http, random.Random(opts.seed * 100_003 + i)))
                     for i in range(opts.clients)]
            await asyncio.sleep(duration_s)
            for task in tasks:  # time is up: whatever is in flight is cut, as a mass disconnect
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, 1.0))  # do not all connect in the same millisecond
        while True:
            await self._request(http, rng)

    async def _request(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        t, loop = self.tally, asyncio.get_running_loop()
        body = self.body(rng)
        cut = rng.randint(0, CUT_EVENTS) if rng.random() < self.opts.disconnect_p else None
        patience = rng.uniform(0.05, 2.0) if cut == 0 else None  # hang up while (probably) still queued
        started = loop.time()
        t.started += 1
        state = "in flight"
        try:
            async with asyncio.timeout(patience):
                state = await self._stream(http, body, cut, started)
        except TimeoutError:  # asyncio.timeout's, i.e. our own patience ran out
            t.disconnected += 1
            return
        except httpx.ReadTimeout:
            t.hangs += 1
        except httpx.HTTPError as exc:
            t.transport_errors[type(exc).__name__] += 1
            await asyncio.sleep(self.opts.backoff_s)
        except asyncio.CancelledError:  # the time is up
            t.cut_at_end += 1
            raise
        if state in ("refused", "error"):  # back off, as a client should (and never spin on errors)
            await asyncio.sleep(self.opts.backoff_s * rng.uniform(0.5, 1.5))

    async def _stream(
        self, http: httpx.AsyncClient, body: dict[str, Any], cut: int | None, started: float
    ) -> str:
        t, loop = self.tally, asyncio.get_running_loop()
        async with http.stream("POST", self.run_url, json=body) as response:
            if response.status_code != 200:
                code = _error_code(await response.aread())
                t.responses[f"{response.status_code} {code}"] += 1
                if response.status_code == 429:
                    t.refusal_s.append(loop.time() - started)
                    return "refused"
                return "error"
            t.responses["200"] += 1
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    t.completed += 1
                    return "done"
                event = json.loads(data)
                if "errors" in event:
                    t.stream_errors[_error_code(data.encode())] += 1
                    return "error"
                if events == 0:
                    t.ttft_s.append(loop.time() - started)
                events += 1
                if "usage" in event:
                    t.tokens += int(event["usage"].get("completion_tokens", 0))
                elif cut is not None and events >= cut:
                    t.tokens += events
                    t.disconnected += 1
                    return "disconnected"  # leaving the block closes the connection mid-stream
            t.truncated += 1
            return "truncated"

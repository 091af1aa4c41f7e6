"""One request's stream as the server reads it, shared by the two faces of the engine: the step thread
(async_engine.py) and the client of an engine in its own process (core_process/client.py).

A stream turns the engine's token ids into StreamEvents (UTF-8-safe text deltas, logprobs named by their
bytes) and hands them to an asyncio queue; closing its events before the end aborts the request.
Torch-free: the client side of the process split imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loraserve.engine.core.sequence import TokenScores
from loraserve.engine.weights.detokenizer import IncrementalDetokenizer
from loraserve.engine.weights.token_bytes import TokenBytes
from loraserve.types import FinishReason, PositionLogprobs, StreamEvent, TokenLogprob

# An event's (logprobs, prompt_logprobs), as StreamEvent holds them.
Logprobs = tuple[tuple[PositionLogprobs, ...], tuple[PositionLogprobs, ...] | None]
NO_LOGPROBS: Logprobs = ((), None)


@dataclass
class Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StreamEvent]
    detok: IncrementalDetokenizer
    num_prompt: int
    done: bool = False

    def event(self, token: int | None, finish: FinishReason | None, num_output: int, error: str | None,
              logprobs: Logprobs = NO_LOGPROBS, cached_tokens: int = 0) -> StreamEvent:
        """The next event: `token`'s text (and whatever is held back, at the finish). Marks the stream
        done at its finishing event. `cached_tokens` is the sequence's `num_cached_prompt` (0 for an
        event that ends a request the engine never ran)."""
        text = self.detok.push(token) if token is not None else ""
        if finish is not None:
            text += self.detok.flush()
            self.done = True
        return StreamEvent(text, self.num_prompt, num_output, finish,
                           error if finish in (FinishReason.ERROR, FinishReason.LOST) else None, *logprobs,
                           cached_tokens)


def event_logprobs(names: TokenBytes, sampled: TokenScores | None,
                   prompt_scores: Sequence[TokenScores] | None, prompt_ids: Sequence[int]) -> Logprobs:
    """A step's scores as the server reports them: each token with its bytes. `prompt_scores` are the
    prompt's tokens 1, 2, ...; the first prompt token has no logprob (nothing predicts it)."""
    generated = (position_logprobs(names, sampled),) if sampled is not None else ()
    if prompt_scores is None:
        return generated, None
    first = prompt_ids[0]
    return generated, (PositionLogprobs(first, names(first), None),
                       *(position_logprobs(names, s) for s in prompt_scores))


def position_logprobs(names: TokenBytes, scores: TokenScores) -> PositionLogprobs:
    token, *top = [TokenLogprob(i, names(i), lp) for i, lp in zip(scores.ids, scores.logprobs, strict=True)]
    return PositionLogprobs(token.token_id, token.token, token.logprob, tuple(top))


class RequestEvents:
    """One request's events. Closing it, or cancelling a read, before the last event aborts the request,
    which frees its KV blocks and adapter pin at once. Not an async generator: one closed before its first
    read would never run its `finally`, and its request would generate on for nobody."""

    def __init__(self, abort: Callable[[str], None], request_id: str, stream: Stream) -> None:
        self._abort, self._request_id, self._stream = abort, request_id, stream
        self._ended = False

    def __aiter__(self) -> RequestEvents:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._ended:
            raise StopAsyncIteration
        try:
            event = await self._stream.queue.get()
        except BaseException:  # cancelled: the consumer went away (a client disconnect)
            await self.aclose()
            raise
        if event.finish_reason is not None:
            self._ended = True
        return event

    async def aclose(self) -> None:
        self._ended = True
        if not self._stream.done:
            self._abort(self._request_id)

"""A request's state inside the engine: its tokens, how many have KV cached, its blocks. Pure Python."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from loraserve.types import FinishReason, SamplingParams

_ids = itertools.count()


@dataclass(frozen=True)
class TokenScores:
    """One position's log-probabilities as the runner computes them: `ids[0]` is the token at the
    position (sampled, or the prompt's) and `logprobs[0]` its own; then the k most likely tokens there,
    most likely first."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_key: str | None = None
    # Prefix-cache scope: sequences share cached K/V only with the same salt (the server: the account).
    cache_salt: str | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(init=False)
    # Tokens whose K/V sit in the cache. A preempted sequence drops to 0 and recomputes prompt + output.
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix hashes of full blocks (block_manager)
    num_cached_blocks: int = 0  # leading blocks filed in (or taken from) the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    # Prompt tokens the prefix cache stood in for when the sequence was first admitted: what the client
    # saved, reported in its usage. A preempted sequence may take more from the cache when re-admitted
    # (its own blocks, even its output's), but that recompute is the engine's cost, not the request's.
    num_cached_prompt: int = 0
    # Scores of prompt tokens 1, 2, ... as prefill computes them, chunk after chunk (None unless the
    # request asked: params.prompt_logprobs). Kept across preemption: recomputing never redoes them.
    prompt_scores: list[TokenScores] | None = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        self.token_ids = list(self.prompt_ids)
        self.prompt_scores = [] if self.params.prompt_logprobs is not None else None

    @property
    def first_logits(self) -> int:
        """The first position whose logits are still wanted: the next prompt position to score (position
        p scores token p + 1), else the last token's (they pick the next token). The prefix cache may
        stand in for the K/V of the positions before it, never for this one's."""
        if self.prompt_scores is not None and len(self.prompt_scores) < self.num_prompt - 1:
            return len(self.prompt_scores)
        return self.num_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

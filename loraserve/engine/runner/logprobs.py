"""Which rows of a step need logits, and log-probabilities from them.

A step computes the head (the one [rows, vocab] matmul) only for the rows whose logits are used: each
sampling sequence's last row and, for a request that asked for its prompt's logprobs, every prompt
position of the chunk that scores a token not yet scored. Position p's logits score token p + 1, so a
chunk's rows cover the prompt up to the token the next chunk starts with (its id is known), and the
scores accumulate on the sequence chunk after chunk.

Log-probabilities are those of the model's raw next-token distribution: log_softmax of the logits the
forward pass produced with the request's adapter, before temperature, top-k/p and penalties (vLLM's
default). They never feed back into sampling, so asking for them changes no token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraserve.engine.core.scheduler import ScheduledSeq
from loraserve.engine.core.sequence import Sequence, TokenScores

# A whole prompt chunk's rows at once would add a second [rows, vocab] tensor beside the logits (1024 rows
# of a 49k vocabulary: 200 MB); this many at a time keep it small.
_ROWS_AT_ONCE = 128


@dataclass
class SeqRows:
    """Where one scheduled sequence's logits sit among the step's."""

    seq: Sequence
    prompt_rows: range  # logits rows that score prompt tokens, in position order
    prompt_targets: list[int]  # the prompt tokens they score
    sample_row: int | None  # the logits row its next token is sampled from


@dataclass
class LogitsRows:
    """The step's logits rows: `indices[i]` is the flat token row (of the step's T) whose logits are
    row i, and `seqs` says whose each is, in the order of the scheduled sequences."""

    indices: list[int] = field(default_factory=list)
    seqs: list[SeqRows] = field(default_factory=list)

    @classmethod
    def plan(cls, order: list[ScheduledSeq]) -> LogitsRows:
        rows = cls()
        flat = 0
        for s in order:
            seq, start = s.seq, s.seq.num_computed
            end = start + s.num_new
            first = len(rows.indices)
            targets: list[int] = []
            if seq.prompt_scores is not None:
                lo, hi = max(start, len(seq.prompt_scores)), min(end, seq.num_prompt - 1)
                if hi > lo:
                    rows.indices.extend(range(flat + lo - start, flat + hi - start))
                    targets = seq.token_ids[lo + 1:hi + 1]
            prompt_rows = range(first, len(rows.indices))
            sample_row = None
            if s.samples and seq.params.max_tokens > 0:  # max_tokens 0 scores the prompt only
                sample_row = len(rows.indices)
                rows.indices.append(flat + s.num_new - 1)
            rows.seqs.append(SeqRows(seq, prompt_rows, targets, sample_row))
            flat += s.num_new
        return rows

    @property
    def sampling(self) -> list[SeqRows]:
        return [r for r in self.seqs if r.sample_row is not None]


def score(logprobs: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenScores]:
    """Per row of `logprobs` [R, V] (log_softmax already taken): the target token's logprob and the
    row's k most likely tokens."""
    if not targets:
        return []
    dev = logprobs.device
    chosen = logprobs.gather(1, torch.tensor(targets, device=dev).unsqueeze(1)).squeeze(1).tolist()
    top_ids: list[list[int]] = [[] for _ in targets]
    top_values: list[list[float]] = [[] for _ in targets]
    if (widest := max(ks)) > 0:
        values, ids = logprobs.topk(widest, dim=-1)  # sorted, most likely first
        top_values, top_ids = values.tolist(), ids.tolist()
    return [TokenScores((t, *i[:k]), (c, *v[:k]))
            for t, c, i, v, k in zip(targets, chosen, top_ids, top_values, ks, strict=True)]


def score_prompts(logits: torch.Tensor, rows: LogitsRows) -> dict[int, list[TokenScores]]:
    """seq_id -> the scores of the prompt tokens this step's chunk covers."""
    wanted = [r for r in rows.seqs if r.prompt_rows]
    if not wanted:
        return {}
    index = torch.tensor([i for r in wanted for i in r.prompt_rows], device=logits.device)
    targets = [t for r in wanted for t in r.prompt_targets]
    ks = [k for r in wanted for k in [r.seq.params.prompt_logprobs or 0] * len(r.prompt_rows)]
    scored: list[TokenScores] = []
    for at in range(0, len(targets), _ROWS_AT_ONCE):
        part = slice(at, at + _ROWS_AT_ONCE)
        logprobs = torch.log_softmax(logits.index_select(0, index[part]), dim=-1)
        scored += score(logprobs, targets[part], ks[part])
    out: dict[int, list[TokenScores]] = {}
    at = 0
    for r in wanted:
        out[r.seq.seq_id] = scored[at:at + len(r.prompt_rows)]
        at += len(r.prompt_rows)
    return out

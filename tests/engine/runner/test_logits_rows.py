"""Which rows of a step get logits (LogitsRows) and the scores read from them, on hand-made steps."""

from __future__ import annotations

from typing import Any

import torch

from loraserve.engine.core.scheduler import ScheduledSeq
from loraserve.engine.core.sequence import Sequence, TokenScores
from loraserve.engine.runner.logprobs import LogitsRows, score, score_prompts
from loraserve.types import SamplingParams


def _seq(request_id: str, prompt: int, computed: int, **params: Any) -> Sequence:
    """Prompt token p is 10 + p."""
    seq = Sequence(request_id, list(range(10, 10 + prompt)), SamplingParams(**params))
    seq.num_computed = computed
    return seq


def test_rows_of_a_mixed_step() -> None:
    decode = _seq("decode", 5, 4)  # its last prompt token: one row, sampled
    middle = _seq("middle", 12, 3, prompt_logprobs=2)  # a middle chunk: positions 3..6 score tokens 4..7
    last = _seq("last", 9, 6, prompt_logprobs=0)  # the last chunk: positions 6, 7 score, 8 samples
    plain = _seq("plain", 20, 0)  # a first chunk that asks nothing: no rows
    scoring_only = _seq("zero", 4, 2, max_tokens=0, prompt_logprobs=1)  # scores tokens 3; samples nothing
    resumed = _seq("resumed", 8, 0, prompt_logprobs=1)  # preempted: tokens 1..3 already scored
    assert resumed.prompt_scores is not None
    resumed.prompt_scores.extend([TokenScores((0,), (0.0,))] * 3)
    order = [ScheduledSeq(decode, 1), ScheduledSeq(middle, 4), ScheduledSeq(last, 3), ScheduledSeq(plain, 6),
             ScheduledSeq(scoring_only, 2), ScheduledSeq(resumed, 6)]
    rows = LogitsRows.plan(order)
    # Flat rows: decode 0; middle 1..4; last 5..7; plain 8..13; zero 14..15; resumed 16..21.
    assert rows.indices == [0, 1, 2, 3, 4, 5, 6, 7, 14, 19, 20, 21]
    by_id = {r.seq.request_id: r for r in rows.seqs}
    assert (by_id["decode"].prompt_rows, by_id["decode"].sample_row) == (range(1, 1), 0)
    assert by_id["middle"].prompt_rows == range(1, 5) and by_id["middle"].prompt_targets == [14, 15, 16, 17]
    assert by_id["middle"].sample_row is None
    assert by_id["last"].prompt_rows == range(5, 7) and by_id["last"].prompt_targets == [17, 18]
    assert by_id["last"].sample_row == 7
    assert (by_id["plain"].prompt_rows, by_id["plain"].sample_row) == (range(8, 8), None)
    assert by_id["zero"].prompt_rows == range(8, 9) and by_id["zero"].prompt_targets == [13]
    assert by_id["zero"].sample_row is None
    # Positions 0..2 were scored before the preemption: positions 3..5 score tokens 4..6.
    assert by_id["resumed"].prompt_rows == range(9, 12) and by_id["resumed"].prompt_targets == [14, 15, 16]
    assert [r.seq.request_id for r in rows.sampling] == ["decode", "last"]


def test_scores_are_log_softmax_with_the_top_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    logprobs = torch.log_softmax(logits, dim=-1)
    [a, b] = score(logprobs, [0, 2], [2, 0])
    assert a.ids == (0, 1, 2) and b.ids == (2,)
    assert a.logprobs == tuple(logprobs[0, [0, 1, 2]].tolist()) and b.logprobs == (float(logprobs[1, 2]),)
    assert score(logprobs[:0], [], []) == []


def test_prompt_scores_go_to_their_sequences() -> None:
    one = _seq("one", 4, 0, prompt_logprobs=1)
    two = _seq("two", 3, 0, prompt_logprobs=0)
    rows = LogitsRows.plan([ScheduledSeq(one, 4), ScheduledSeq(two, 3)])
    logits = torch.randn(len(rows.indices), 20, generator=torch.Generator().manual_seed(0))
    scored = score_prompts(logits, rows)
    logprobs = torch.log_softmax(logits, dim=-1)
    assert [s.ids[0] for s in scored[one.seq_id]] == [11, 12, 13]
    assert [s.ids[0] for s in scored[two.seq_id]] == [11, 12]
    # Rows 0..2 are one's prompt positions (row 3 samples), rows 4..5 two's.
    assert scored[two.seq_id][1].logprobs == (float(logprobs[5, 12]),)
    assert scored[one.seq_id][0].ids[1] == int(logprobs[0].argmax())


def test_long_prompts_are_scored_in_parts() -> None:
    """More rows than one log_softmax takes at once: the parts add up to the whole."""
    long = _seq("long", 300, 0, prompt_logprobs=2)
    rows = LogitsRows.plan([ScheduledSeq(long, 300)])
    logits = torch.randn(len(rows.indices), 320, generator=torch.Generator().manual_seed(1))
    scored = score_prompts(logits, rows)[long.seq_id]
    logprobs = torch.log_softmax(logits, dim=-1)
    assert len(scored) == 299 and [s.ids[0] for s in scored] == list(range(11, 310))
    assert [s.logprobs[0] for s in scored] == logprobs[torch.arange(299), torch.arange(11, 310)].tolist()
    assert [s.ids[1:] for s in scored] == [tuple(i) for i in logprobs[:299].topk(2).indices.tolist()]

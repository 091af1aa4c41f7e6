"""Sampling functions on hand-made logits: penalties, top-k/top-p masks, seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from loraserve.engine.runner.sampling import apply_penalties, sample, top_k_top_p
from loraserve.types import SamplingParams

NEG = float("-inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0, 3.0]])
    out = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1]],
                          outputs=[[2, 2]])
    # Seen (prompt or output): 0, 1, 2. Unseen 3 and 4 are untouched.
    assert out.tolist() == [[1.0, -4.0, 2.0, -1.0, 3.0]]


def test_frequency_and_presence_penalties_use_output_counts_only() -> None:
    logits = torch.zeros(1, 5)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(logits.clone(), [p], prompts=[[4, 4, 4]], outputs=[[1, 1, 1, 3]])
    # Token 1: 3 * 0.5 + 1; token 3: 0.5 + 1; prompt token 4 is not penalised by these.
    assert out.tolist() == [[0.0, -2.5, 0.0, -1.5, 0.0]]


def test_negative_penalties_reward_repetition() -> None:
    out = apply_penalties(torch.zeros(1, 3), [SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5)],
                          prompts=[[0]], outputs=[[2, 2]])
    assert out.tolist() == [[0.0, 0.0, 2.5]]


def test_penalties_are_per_row() -> None:
    logits = torch.ones(3, 4)
    params = [SamplingParams(), SamplingParams(presence_penalty=2.0), SamplingParams(repetition_penalty=2.0)]
    out = apply_penalties(logits.clone(), params, prompts=[[0], [0], [1]], outputs=[[3], [3], []])
    assert out.tolist() == [[1, 1, 1, 1], [1, 1, 1, -1], [1, 0.5, 1, 1]]


def test_no_penalty_on_an_empty_output() -> None:
    logits = torch.randn(1, 6)
    out = apply_penalties(logits.clone(), [SamplingParams(frequency_penalty=2.0, presence_penalty=2.0)],
                          prompts=[[1, 2]], outputs=[[]])
    assert torch.equal(out, logits)


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert out[0].tolist() == [NEG, 5.0, NEG, 4.0, NEG]
    assert torch.equal(out[1], logits[1])  # top_k 0: no cut


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])
    logits = probs.log()
    # 0.5 < 0.7 -> keep the next (0.3): mass 0.8 >= 0.7, stop. Kept: tokens 0 and 2.
    out = top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(out[0]).tolist() == [True, False, True, False, False]
    # The top token alone already has 0.5 >= 0.45.
    out = top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.45]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False, False]
    out = top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.85]))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False, False]
    # Values over 1 mean no cut.
    out = top_k_top_p(logits, torch.tensor([0]), torch.tensor([1.5]))
    assert torch.equal(out, logits)


def test_top_p_zero_keeps_the_top_token() -> None:
    logits = torch.tensor([[0.1, 0.3, 0.2]])
    out = top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.0]))
    assert torch.isfinite(out[0]).tolist() == [False, True, False]


def test_top_k_then_top_p_renormalises_over_the_top_k() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # After top-k 2 the kept mass is 0.4 : 0.3 = 0.571 : 0.429; top_p 0.5 keeps only the first.
    out = top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    out = top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.6]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_greedy_rows_take_the_argmax_in_a_mixed_batch() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0)]
    gens = [None, torch.Generator().manual_seed(1), None]
    for _ in range(20):
        toks = sample(logits, params, gens)
        assert toks[0] == 1 and toks[2] == 2


def test_all_greedy_needs_no_generator() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert sample(logits, [SamplingParams(temperature=0)] * 2, [None, None]) == [1, 0]


def test_seeded_draws_reproduce_whatever_shares_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=123)
    g_alone = torch.Generator().manual_seed(123)
    seq_alone = [sample(logits[1:2], [p], [g_alone])[0] for _ in range(30)]
    g_batch = torch.Generator().manual_seed(123)
    other = torch.Generator().manual_seed(999)
    params = [SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.7, top_k=5)]
    seq_batch = [sample(logits, params, [other, g_batch, other])[1] for _ in range(30)]
    assert seq_alone == seq_batch
    assert len(set(seq_alone)) > 3  # really sampled, not a constant
    g_other_seed = torch.Generator().manual_seed(124)
    assert [sample(logits[1:2], [p], [g_other_seed])[0] for _ in range(30)] != seq_alone


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().unsqueeze(0).repeat(4000, 1)
    g = torch.Generator().manual_seed(7)
    n = logits.shape[0]
    toks = sample(logits, [SamplingParams(temperature=1.0)] * n, [g] * n)
    freq = torch.bincount(torch.tensor(toks), minlength=4).float() / n
    # Four sigma of a binomial at n=4000 is under 0.032.
    assert torch.allclose(freq, probs, atol=0.035)


def test_temperature_sharpens_and_flattens() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 3000
    logits = probs.log().unsqueeze(0).repeat(n, 1)

    def top_share(temperature: float) -> float:
        g = torch.Generator().manual_seed(3)
        toks = sample(logits, [SamplingParams(temperature=temperature)] * n, [g] * n)
        return toks.count(0) / n

    cold, hot = top_share(0.25), top_share(2.0)
    # Expected shares of token 0: 0.6^4 / sum = 0.94 at T=0.25; 0.6^0.5 / sum = 0.45 at T=2.
    expect_cold = 0.6 ** 4 / (0.6 ** 4 + 0.3 ** 4 + 0.1 ** 4)
    expect_hot = math.sqrt(0.6) / (math.sqrt(0.6) + math.sqrt(0.3) + math.sqrt(0.1))
    assert cold == pytest.approx(expect_cold, abs=0.04)
    assert hot == pytest.approx(expect_hot, abs=0.04)


def test_top_k_and_top_p_restrict_the_draws() -> None:
    torch.manual_seed(1)
    row = torch.randn(30)
    top2 = set(row.topk(2).indices.tolist())
    n = 500
    logits = row.unsqueeze(0).repeat(n, 1)
    g = torch.Generator().manual_seed(11)
    toks = sample(logits, [SamplingParams(temperature=1.5, top_k=2)] * n, [g] * n)
    assert set(toks) == top2
    toks = sample(logits, [SamplingParams(temperature=1.0, top_p=0.0)] * n, [g] * n)
    assert set(toks) == {int(row.argmax())}


def _reference_mask(row: torch.Tensor, k: int, p: float) -> set[int]:
    """The tokens HF's TopK then TopP warpers keep, by a plain full sort."""
    vocab = row.shape[0]
    k = min(k if k > 0 else vocab, vocab)
    sorted_logits, order = row.sort(descending=True)
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[:k] = True
    if p < 1.0:
        probs = sorted_logits[:k].softmax(-1)
        before = probs.cumsum(-1) - probs
        keep[:k] &= before < p
        keep[0] = True
    return set(order[keep].tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_top_p_on_a_large_vocabulary_matches_a_full_sort(seed: int) -> None:
    """Large vocabularies take the candidate shortcut; flat rows whose nucleus reaches past the
    candidates, and top-k beyond them, must still give exactly the full-sort answer."""
    g = torch.Generator().manual_seed(seed)
    vocab = 5000
    cases = [  # (temperature-like spread, top_k, top_p)
        (8.0, 0, 0.9),  # peaked: the nucleus closes within a few tokens
        (0.3, 0, 0.9),  # flat: the nucleus needs thousands of tokens
        (0.3, 0, 0.2),
        (1.0, 300, 1.0),  # top-k wider than the candidates
        (0.3, 1000, 0.5),  # both, with the nucleus inside the top-k but past the candidates
        (2.0, 40, 0.7),
        (1.0, 0, 1.0),  # no cut
        (1.0, 1, 0.3),
    ]
    logits = torch.stack([torch.randn(vocab, generator=g) * spread for spread, _, _ in cases])
    top_k = torch.tensor([k for _, k, _ in cases])
    top_p = torch.tensor([p for _, _, p in cases])
    out = top_k_top_p(logits.clone(), top_k, top_p)
    for i, (_, k, p) in enumerate(cases):
        kept = set(torch.isfinite(out[i]).nonzero().flatten().tolist())
        assert kept == _reference_mask(logits[i], k, p), cases[i]
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])  # kept logits unchanged
    assert len(_reference_mask(logits[1], 0, 0.9)) > 256  # the fallback case really is one


def test_sampling_stays_inside_the_mask_on_a_large_vocabulary() -> None:
    g = torch.Generator().manual_seed(5)
    row = torch.randn(3000, generator=g) * 0.3
    allowed = _reference_mask(row, 0, 0.3)
    assert len(allowed) > 256
    n = 400
    params = [SamplingParams(temperature=1.0, top_p=0.3)] * n
    toks = sample(row.unsqueeze(0).repeat(n, 1), params, [torch.Generator().manual_seed(9)] * n)
    assert set(toks) <= allowed and len(set(toks)) > 50


def test_greedy_rows_take_the_engine_s_argmax() -> None:
    """The engine hands sample() its backend's argmax (a C kernel on the CPU): greedy rows, alone or beside
    sampled ones, take what it returns."""
    logits = torch.randn(3, 10)
    picked = torch.tensor([7, 8, 9])
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
    assert sample(logits, [greedy] * 3, [None] * 3, lambda _: picked) == [7, 8, 9]
    toks = sample(logits, [greedy, hot, greedy], [None, torch.Generator().manual_seed(1), None],
                  lambda _: picked)
    assert toks[0] == 7 and toks[2] == 9 and 0 <= toks[1] < 10

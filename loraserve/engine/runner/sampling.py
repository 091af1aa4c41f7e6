"""Sampling as small pure tensor functions over a batch of rows, each with its own parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loraserve.engine.ops.glue import torch_argmax
from loraserve.types import SamplingParams


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Repetition (CTRL/HF style, prompt + output) and frequency/presence (OpenAI style, output only)."""
    for i, p in enumerate(params):
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompts[i]) | set(outputs[i])), dtype=torch.long,
                                device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and outputs[i]:
            ids = torch.tensor(outputs[i], dtype=torch.long, device=row.device)
            counts = torch.bincount(ids, minlength=row.shape[0]).to(row.dtype)  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


# Nucleus search starts in the top few hundred tokens; a full sort only when they lack the mass.
_CANDIDATES = 256


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus. top_k 0 and top_p >= 1 mean no cut. [S, V].

    Sorting a 49k vocabulary for 32 rows costs ~100 ms on this CPU, so the cut is searched among the
    top candidates (topk) and rows whose nucleus reaches past them fall back to a full sort.
    """
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)  # [S]
    p = top_p.clamp(max=1.0)
    width = min(vocab, max(_CANDIDATES, int(k[k < vocab].max()) if bool((k < vocab).any()) else 0))
    vals, order = logits.topk(width, dim=-1)  # [S, W], sorted descending
    probs = (vals - logits.logsumexp(dim=-1, keepdim=True)).exp()  # true probabilities of the candidates
    # Renormalise over the top-k set (when top_k cuts first) before the nucleus test, as HF does.
    ranks = torch.arange(width, device=logits.device).unsqueeze(0)  # [1, W]
    in_k = ranks < k.unsqueeze(1)
    kept = probs.masked_fill(~in_k, 0.0)
    kept = kept / torch.where(k < vocab, kept.sum(-1), torch.ones_like(p)).unsqueeze(1)
    before = kept.cumsum(dim=-1) - kept
    keep = in_k & (before < p.unsqueeze(1))
    keep[:, 0] = True
    # Rows whose nucleus is not closed inside the candidates (and that top_k does not bound) need all tokens.
    open_rows = (p < 1.0) & (k > width) & (kept.sum(-1) < p)
    out = torch.full_like(logits, float("-inf")).scatter_(-1, order, vals.masked_fill(~keep, float("-inf")))
    no_cut = (k >= vocab) & (p >= 1.0)
    out[no_cut] = logits[no_cut]
    for row in open_rows.nonzero().flatten().tolist():
        out[row] = _full_nucleus(logits[row], float(p[row]))
    return out


def _full_nucleus(row: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = row.sort(descending=True)
    probs = sorted_logits.softmax(-1)
    cut = (probs.cumsum(-1) - probs) >= top_p
    cut[0] = False
    return torch.empty_like(row).scatter_(-1, order, sorted_logits.masked_fill(cut, float("-inf")))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: Sequence[torch.Generator | None],
           argmax: Callable[[torch.Tensor], torch.Tensor] = torch_argmax) -> list[int]:
    """One token per row. Seeded rows draw from their own generator, so a seed reproduces its output
    whatever else shares the batch; unseeded rows share the engine's default generator. Greedy rows take
    `argmax(logits)` (the engine's: `Glue.argmax`, a C kernel on the CPU)."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        return argmax(logits).tolist()
    dev = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    scaled = logits / temps.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        scaled = top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    # Inverse-CDF sampling: one uniform draw per row (its own generator when seeded). Exponential-race or
    # multinomial sampling would draw a noise value per vocabulary entry: ~20 ms a step at batch 32 here.
    u = torch.cat([torch.rand(1, generator=g, device=dev) for g in generators])  # [S]
    cdf = probs.cumsum(dim=-1)  # [S, V]
    target = (u * cdf[:, -1]).clamp(min=torch.finfo(cdf.dtype).tiny).unsqueeze(1)
    drawn = torch.searchsorted(cdf, target).squeeze(1).clamp(max=probs.shape[-1] - 1)
    if not any(greedy):
        return drawn.tolist()  # no greedy row: no argmax over the vocabulary (BENCHMARKS.md)
    return torch.where(torch.tensor(greedy, device=dev), argmax(logits), drawn).tolist()

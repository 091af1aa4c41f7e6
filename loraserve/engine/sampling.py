"""Sampling as small pure tensor functions over a batch of rows, each with its own parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraserve.types import SamplingParams


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> torch.Tensor:
    """Repetition (CTRL/HF style, prompt + output) and frequency/presence (OpenAI style, output only)."""
    for i, p in enumerate(params):
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompts[i]) | set(outputs[i])), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and outputs[i]:
            ids = torch.tensor(outputs[i], dtype=torch.long, device=row.device)
            counts = torch.bincount(ids, minlength=row.shape[0]).to(row.dtype)  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus. top_k 0 and top_p >= 1 mean no cut. [S, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    cut = ranks >= k.unsqueeze(1)
    probs = sorted_logits.masked_fill(cut, float("-inf")).softmax(dim=-1)
    # Keep a token while the mass before it is < top_p, so the top token always survives.
    before = probs.cumsum(dim=-1) - probs
    cut |= before >= top_p.clamp(max=1.0).unsqueeze(1)
    cut[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row. Seeded rows draw from their own generator, so a seed reproduces its output
    whatever else shares the batch; unseeded rows share the engine's default generator."""
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy.tolist()
    dev = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    scaled = logits / temps.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        scaled = top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, one noise row per request.
    noise = torch.empty_like(probs)
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    drawn = (probs / noise).argmax(dim=-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=dev)
    return torch.where(is_greedy, greedy, drawn).tolist()

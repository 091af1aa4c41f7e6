"""RoPE frequency tables, with the variants configs name (`rope_scaling`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from loraserve.engine.config import ModelConfig


def rope_tables(cfg: ModelConfig, device: torch.device,
                local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_pos, D] in HF's rotate_half layout (the two halves repeat the frequencies). `local`:
    the sliding layers' own table (Gemma 3: `rope_local_theta`, unscaled)."""
    d = cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta is not None else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = {} if local else (cfg.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif kind == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        inv_freq = inv_freq / float(scaling["factor"])
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def _llama3_scale(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1's long-context scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    # ramp between.
    factor, low, high = (float(s["factor"]), float(s.get("low_freq_factor", 1.0)),
                         float(s.get("high_freq_factor", 4.0)))
    old_ctx = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(is_mid, mid, scaled)

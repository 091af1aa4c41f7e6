"""What one forward pass reads: the step's rows (`BatchMeta`) and the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.lora.pool import LoraGroup
from loraserve.engine.ops.attention import AttentionPlan


class StepLora(Protocol):
    """A step's adapters (`LoraBatch`, or `StaticLora` in a CUDA graph)."""

    def apply(self, layer: int, group: LoraGroup, x: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclass
class BatchMeta:
    """Everything the forward pass needs about one step, built by the model runner; no hidden globals.
    Tokens of many sequences are flattened into one row each (`T` rows)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token writes
    num_decode: int  # rows [0, num_decode) are single-token decodes, one per sequence
    attention: AttentionPlan  # built by the attention backend
    logits_indices: torch.Tensor  # [S] rows whose next token is sampled
    lora: StepLora | None = None


class Zeros(Protocol):
    """Where an engine's long-lived buffers come from (`Ops.zeros`): torch.zeros on its device."""

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor: ...


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, zeros: Zeros) -> None:
        # k, v: [L, num_blocks * block_size + 1, Hkv, D]; a flat slot index addresses one token's K/V. The
        # last slot belongs to no block: padding rows of a static (CUDA-graph) batch write and read it.
        self.scratch_slot = num_slots
        shape = (cfg.num_layers, num_slots + 1, cfg.num_kv_heads, cfg.head_dim)
        self.k = zeros(shape, dtype)
        self.v = zeros(shape, dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per layer (k, v) views

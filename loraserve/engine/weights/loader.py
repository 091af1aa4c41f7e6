"""Loading a base model: `ModelConfig`, a state dict in Hugging Face names, and the tokenizer.

The state dict holds `model.embed_tokens.weight`, per layer
`model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
`model.layers.{i}.input_layernorm.weight` and `.post_attention_layernorm.weight`, then
`model.norm.weight`, and `lm_head.weight` only when the head is not tied to the embedding; and what the
model's family adds (`expected_shapes`: Qwen2's q/k/v biases, Gemma 2/3's pre/post-feedforward norms,
q_norm/k_norm). Every tensor is in the requested dtype, or a GGUF file's blocks as stored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.gguf_file import load_gguf
from loraserve.engine.weights.hf import StateDict, expected_shapes, load_hf_dir
from loraserve.engine.weights.tokenizer import Tokenizer

__all__ = ["StateDict", "expected_shapes", "load_gguf", "load_hf_dir", "load_model"]


def load_model(path: str | Path, dtype: torch.dtype) -> tuple[ModelConfig, StateDict, Tokenizer]:
    """A GGUF file or a Hugging Face directory, whichever `path` is."""
    source = Path(path)
    if source.is_dir():
        config, state = load_hf_dir(source, dtype)
        return config, state, Tokenizer.from_hf_dir(source)
    if source.suffix == ".gguf":
        return load_gguf(source, dtype)
    raise ValueError(f"{source}: expected a .gguf file or a Hugging Face model directory")

"""Weights from a Hugging Face directory, and the names and shapes every loader must produce.

`config.json` plus `*.safetensors` (single or sharded) or `pytorch_model*.bin`, read memory-mapped
and converted one tensor at a time, so peak memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.quant import Weight

StateDict = dict[str, Weight]  # HF names -> float tensors, or GGUF blocks kept as stored

# Buffers some old checkpoints saved beside the weights; the engine computes them, so they are dropped.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs, in HF names, with its torch shape ([out_features, in_features])."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h),
                                          "model.norm.weight": (h,)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "self_attn.q_proj.weight": (config.q_size, h),
            p + "self_attn.k_proj.weight": (config.kv_size, h),
            p + "self_attn.v_proj.weight": (config.kv_size, h),
            p + "self_attn.o_proj.weight": (h, config.q_size),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_complete(state: StateDict, config: ModelConfig, source: object) -> None:
    """Raise ValueError naming the first problem: a missing tensor or one whose shape the config
    contradicts."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, "
                             f"the config says {shape}")


def load_hf_dir(path: str | Path, dtype: torch.dtype) -> tuple[ModelConfig, StateDict]:
    root = Path(path)
    config = ModelConfig.from_hf(json.loads((root / "config.json").read_text(encoding="utf-8")))
    expected = expected_shapes(config)
    state: StateDict = {}
    for name, tensor in _tensors(root):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a tied head saved anyway is the embedding again
        if name not in expected:
            if _IGNORED.fullmatch(name):
                continue
            raise ValueError(f"{root}: unexpected tensor {name} (not a Llama-family decoder?)")
        state[name] = tensor.to(dtype)
    check_complete(state, config, root)
    return config, state


def _shards(root: Path, index_name: str, pattern: str) -> list[Path]:
    index = root / index_name
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [root / f for f in sorted(set(weight_map.values()))]
    return sorted(root.glob(pattern))


def _tensors(root: Path) -> Iterator[tuple[str, torch.Tensor]]:
    safetensors = _shards(root, "model.safetensors.index.json", "*.safetensors")
    if safetensors:
        for file in safetensors:
            with safe_open(str(file), framework="pt") as f:  # memory-mapped: one tensor read at a time
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        return
    bins = _shards(root, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not bins:
        raise ValueError(f"{root}: no *.safetensors or pytorch_model*.bin")
    for file in bins:
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        while tensors:  # popped as they go, so a converted tensor never sits beside its original for long
            name = next(iter(tensors))
            yield name, tensors.pop(name)

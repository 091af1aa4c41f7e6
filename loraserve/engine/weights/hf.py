"""Weights from a Hugging Face directory, and the names and shapes every loader must produce.

`config.json` plus `*.safetensors` (single or sharded) or `pytorch_model*.bin`, read memory-mapped
and converted one tensor at a time, so peak memory stays near one copy of the model. Every served family
(hf_config.py reads its config.json), a multimodal Gemma 3 / Mistral 3 as its text model (hf_names.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from loraserve.engine.config import ModelConfig
from loraserve.engine.models.family import family_of
from loraserve.engine.weights.hf_config import text_config
from loraserve.engine.weights.hf_names import CheckpointNames
from loraserve.engine.weights.quant import Weight

StateDict = dict[str, Weight]  # HF names -> float tensors, or GGUF blocks kept as stored
# What becomes of each checkpoint tensor as it is read: by default `tensor.to(dtype)`; quantize.py passes
# one that quantizes it.
Convert = Callable[[str, torch.Tensor], Weight]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs, in HF names, with its torch shape ([out_features, in_features]):
    what `config`'s family has besides Llama's (q/k/v biases, four norms a layer, q/k norms) included."""
    family = family_of(config.architecture)
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
        if family.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (config.q_size,),
                       p + "self_attn.k_proj.bias": (config.kv_size,),
                       p + "self_attn.v_proj.bias": (config.kv_size,)}
        if family.sandwich_norms:
            shapes |= {p + "pre_feedforward_layernorm.weight": (h,),
                       p + "post_feedforward_layernorm.weight": (h,)}
        if family.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (config.head_dim,),
                       p + "self_attn.k_norm.weight": (config.head_dim,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


class _Shaped(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


def check_complete(state: Mapping[str, _Shaped], config: ModelConfig, source: object) -> None:
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


def hf_config(root: Path) -> ModelConfig:
    """The model config.json describes (`load_hf_dir` may untie its head: see `_tying`)."""
    return ModelConfig.from_hf(_config_json(root))


def load_hf_dir(path: str | Path, dtype: torch.dtype,
                convert: Convert | None = None) -> tuple[ModelConfig, StateDict]:
    root = Path(path)
    config, names = _plan(root)
    expected = expected_shapes(config)
    state: StateDict = {}
    for stored, tensor in _tensors(root):
        name = _taken(root, stored, names, config, expected, state)
        if name is not None:
            state[name] = tensor.to(dtype) if convert is None else convert(name, tensor)
    check_complete(state, config, root)
    return config, state


def hf_tensors(root: Path) -> tuple[ModelConfig, dict[str, LazyTensor]]:
    """The tensors the engine takes, not read yet, in `expected_shapes` order; checked as load_hf_dir
    checks them."""
    config, names = _plan(root)
    expected = expected_shapes(config)
    found: dict[str, LazyTensor] = {}
    for stored, tensor in lazy_tensors(root).items():
        name = _taken(root, stored, names, config, expected, found)
        if name is not None:
            found[name] = tensor
    check_complete(found, config, root)
    return config, {name: found[name] for name in expected}


def _config_json(root: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((root / "config.json").read_text(encoding="utf-8"))
    return raw


def _plan(root: Path) -> tuple[ModelConfig, CheckpointNames]:
    raw = _config_json(root)
    names = CheckpointNames(wrapped=text_config(raw) is not None)
    return _tying(root, ModelConfig.from_hf(raw), names), names


def _tying(root: Path, config: ModelConfig, names: CheckpointNames) -> ModelConfig:
    """A config that ties the head to the embedding, over a checkpoint whose saved head differs from it,
    is untied, as transformers 5 does (Mistral 3's wrapper ties by default; Mistral-Small-3.1 has a head
    of its own): only then are the two tensors read here."""
    if not config.tie_word_embeddings:
        return config
    tensors = {names.engine_name(stored): t for stored, t in lazy_tensors(root).items()}
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is None or embed is None or torch.equal(head.load(), embed.load()):
        return config
    return replace(config, tie_word_embeddings=False)


def _taken(root: Path, stored: str, names: CheckpointNames, config: ModelConfig,
           expected: Mapping[str, object], state: Mapping[str, object]) -> str | None:
    """The engine's name for a stored tensor, or None for one it leaves out; ValueError for one it does not
    know, or a second tensor of one name."""
    name = names.engine_name(stored)
    if name is None or (name == "lm_head.weight" and config.tie_word_embeddings):
        return None  # a tied head saved anyway is the embedding again
    if name not in expected:
        raise ValueError(f"{root}: unexpected tensor {stored} (not a {config.architecture} decoder?)")
    if name in state:
        raise ValueError(f"{root}: {stored} is a second copy of {name}")
    return name


def _shards(root: Path, index_name: str, pattern: str) -> list[Path]:
    index = root / index_name
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [root / f for f in sorted(set(weight_map.values()))]
    return sorted(root.glob(pattern))


def checkpoint_files(root: Path) -> list[Path]:
    """The weight files: safetensors shards if there are any, else pytorch_model*.bin."""
    files = _shards(root, "model.safetensors.index.json", "*.safetensors")
    files = files or _shards(root, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not files:
        raise ValueError(f"{root}: no *.safetensors or pytorch_model*.bin")
    return files


@dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor not read yet: its shape from the file header, `load()` reads it."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def lazy_tensors(root: Path) -> dict[str, LazyTensor]:
    """Every tensor of the checkpoint by name, each read only when asked (files stay memory-mapped)."""
    found: dict[str, LazyTensor] = {}
    for file in checkpoint_files(root):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                found |= {name: LazyTensor(tuple(f.get_slice(name).get_shape()), partial(_read, file, name))
                          for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            found |= {name: LazyTensor(tuple(t.shape), partial(tensors.__getitem__, name))
                      for name, t in tensors.items()}
    return found


def _read(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def _tensors(root: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(root)
    if files[0].suffix == ".safetensors":
        for file in files:
            with safe_open(str(file), framework="pt") as f:  # memory-mapped: one tensor read at a time
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        return
    for file in files:
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        while tensors:  # popped as they go, so a converted tensor never sits beside its original for long
            name = next(iter(tensors))
            yield name, tensors.pop(name)

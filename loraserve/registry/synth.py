"""Synthetic PEFT adapter files, for tests, benchmarks and the validation fuzzer (numpy only, no torch).

`encode_safetensors` writes the real format; `raw_safetensors` writes any header at all, so that
broken files can be crafted on purpose.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from loraserve.registry.validate_config import PROJ_SECTION
from loraserve.types import ModelInfo

PEFT_PREFIX = "base_model.model."
_NUMPY_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


@dataclass(frozen=True)
class RawTensor:
    """A tensor given as bytes, for dtypes numpy lacks (BF16) or for deliberately wrong sizes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def bf16(array: np.ndarray) -> RawTensor:
    """float32 -> bfloat16 by truncation (the top 16 bits)."""
    f32 = np.ascontiguousarray(array, dtype="<f4")
    return RawTensor("BF16", tuple(f32.shape), (f32.view("<u4") >> 16).astype("<u2").tobytes())


def raw_safetensors(header: Mapping[str, object], data: bytes, header_len: int | None = None) -> bytes:
    """A file with exactly this header and data region; `header_len` overrides the length prefix."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def encode_safetensors(
    tensors: Mapping[str, np.ndarray | RawTensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if isinstance(tensor, RawTensor):
            dtype, shape, blob = tensor.dtype, list(tensor.shape), tensor.data
        else:
            dtype = _NUMPY_DTYPES[tensor.dtype]
            shape, blob = (
                list(tensor.shape),
                np.ascontiguousarray(tensor).astype(tensor.dtype.newbyteorder("<")).tobytes(),
            )
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    return raw_safetensors(header, b"".join(chunks))


def lora_name(layer: int, proj: str, ab: str, prefix: str = PEFT_PREFIX) -> str:
    return f"{prefix}model.layers.{layer}.{PROJ_SECTION[proj]}.{proj}.lora_{ab}.weight"


def lora_tensors(
    base: ModelInfo,
    r: int,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
    ranks: Mapping[str, int] | None = None,
    dtype: type[np.floating] = np.float32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A PEFT-shaped adapter's tensors: per targeted module, A [r, in] and B [out, r] (B non-zero, unlike
    a fresh PEFT adapter, so that applying it changes the output). `ranks` overrides r per projection."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in range(base.num_layers) if layers is None else layers:
        for proj in targets:
            in_f, out_f = base.lora_shapes[proj]
            rank = (ranks or {}).get(proj, r)
            out[lora_name(layer, proj, "A")] = (rng.standard_normal((rank, in_f)) / math.sqrt(in_f)).astype(
                dtype
            )
            out[lora_name(layer, proj, "B")] = (rng.standard_normal((out_f, rank)) * 0.01).astype(dtype)
    return out


def adapter_config(
    r: int, lora_alpha: float, targets: str | Iterable[str] = ("q_proj", "v_proj"), **extra: object
) -> bytes:
    """`adapter_config.json` as PEFT writes it (the fields that matter), plus/overridden by `extra`."""
    config: dict[str, object] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": targets if isinstance(targets, str) else list(targets),  # PEFT allows either
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM",
    }
    config.update(extra)
    return json.dumps(config).encode()


def llama_model_info(
    num_layers: int = 2,
    hidden: int = 16,
    intermediate: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 4,
    vocab_size: int = 64,
    context_window: int = 128,
    architecture: str = "llama",
) -> ModelInfo:
    """What a (tiny, by default) Llama-shaped base looks like to the registry, without loading one. The
    other families served (Gemma, Qwen2, Mistral) have the same projections: `architecture` names one,
    and a head_dim other than hidden / heads gives Gemma's shapes."""
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    return ModelInfo(
        context_window=context_window, num_layers=num_layers, vocab_size=vocab_size, lora_shapes=shapes,
        architecture=architecture,
    )

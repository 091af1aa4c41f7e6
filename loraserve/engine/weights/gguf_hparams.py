"""A model's hyperparameters as GGUF metadata, both ways, and what llama.cpp derives instead of reading.

A file does not hold all of config.json: for "gemma2" and "gemma3" llama.cpp takes the sliding layers from
a fixed period (every 2nd / every 6th layer global) unless the file names a pattern, the query scale from
head_dim (hidden / heads for the 27B models, told by their layer count), Gemma 2's soft-caps and window
from defaults when absent, and Gemma 3's local RoPE base is 10k unless stored. `_attention` derives them
as llama.cpp's load_hparams does; the reader builds the config from it, and the writer checks that the
keys it writes derive the very config it was given, refusing a model llama.cpp would run as another one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.gguf_arch import GGUFArch
from loraserve.engine.weights.gguf_meta import gguf_field
from loraserve.engine.weights.tokenizer import Tokenizer

ROPE_FREQS = "rope_freqs.weight"
_Get = Callable[[str], Any]  # a metadata value by key without the "{arch}." prefix; None when absent
_SLIDING_PERIOD = {GGUFArch.GEMMA2: 2, GGUFArch.GEMMA3: 6}
_WIDE_QUERY_SCALE_LAYERS = {GGUFArch.GEMMA2: 46, GGUFArch.GEMMA3: 62}  # the 27B models
_GEMMA2_DEFAULTS = {"attention.sliding_window": 4096, "attn_logit_softcapping": 50.0,
                    "final_logit_softcapping": 30.0}
_GEMMA3_LOCAL_THETA = 10000.0


def _attention(arch: GGUFArch, layers: int, hidden: int, heads: int, head_dim: int,
               get: _Get) -> dict[str, Any]:
    """The config fields llama.cpp derives for `arch` from the metadata `get` reads."""
    fields: dict[str, Any] = dict(query_pre_attn_scalar=None, attn_logit_softcapping=None,
                                  final_logit_softcapping=None, sliding_window=None, sliding_layers=(),
                                  rope_local_theta=None)
    if arch not in _SLIDING_PERIOD:
        return fields
    defaults = _GEMMA2_DEFAULTS if arch is GGUFArch.GEMMA2 else {}

    def value(key: str) -> Any:
        return _or(get(key), defaults.get(key))

    wide = layers == _WIDE_QUERY_SCALE_LAYERS[arch]
    fields["query_pre_attn_scalar"] = float(hidden // heads if wide else head_dim)
    if arch is GGUFArch.GEMMA2:
        fields["attn_logit_softcapping"] = float(value("attn_logit_softcapping"))
    final = value("final_logit_softcapping")
    fields["final_logit_softcapping"] = float(final) if final else None  # gemma3: 0 is none
    window = int(value("attention.sliding_window") or 0)
    if window > 0:
        pattern = get("attention.sliding_window_pattern")
        if pattern is not None and np.ndim(pattern):  # one flag per layer
            sliding = tuple(bool(f) for f in np.asarray(pattern)[:layers])
        else:  # every period-th layer global, llama.cpp's set_swa_pattern
            period = _SLIDING_PERIOD[arch] if pattern is None else int(pattern)
            sliding = tuple(period == 0 or i % period < period - 1 for i in range(layers))
        fields |= dict(sliding_window=window, sliding_layers=sliding)
        if arch is GGUFArch.GEMMA3:
            fields["rope_local_theta"] = float(_or(get("rope.freq_base_swa"), _GEMMA3_LOCAL_THETA))
    return fields


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def config_from_gguf(reader: gguf.GGUFReader, arch: GGUFArch, tokenizer: Tokenizer) -> ModelConfig:
    """The config llama.cpp runs the file as (BOS/EOS ids from its tokenizer)."""

    def get(key: str) -> Any:
        return gguf_field(reader, f"{arch.value}.{key}")

    def num(key: str, default: float | None = None) -> float:
        value = _or(get(key), default)
        if value is None:
            raise ValueError(f"GGUF metadata {arch.value}.{key} is missing")
        return float(value)

    hidden, heads = int(num("embedding_length")), int(num("attention.head_count"))
    layers = int(num("block_count"))
    head_dim = int(num("attention.key_length", hidden // heads))
    if int(num("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    rope_theta = num("rope.freq_base", 10000.0)
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    scaling = _rope_scaling(get) if freqs is None else _llama3_scaling(np.asarray(freqs.data), rope_theta,
                                                                       head_dim)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(num("vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens")))),
        hidden_size=hidden,
        intermediate_size=int(num("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(num("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=num("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(num("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
        architecture=arch.family.model_type,
        **_attention(arch, layers, hidden, heads, head_dim, get),
    )


def add_hyperparameters(writer: gguf.GGUFWriter, arch: GGUFArch, config: ModelConfig) -> None:
    """The keys llama.cpp's converter writes for `arch`; ValueError for a config they cannot express."""
    keys: dict[str, Any] = {}
    if arch in _SLIDING_PERIOD:
        if config.attn_logit_softcapping is not None:
            keys["attn_logit_softcapping"] = config.attn_logit_softcapping
        if config.final_logit_softcapping is not None:
            keys["final_logit_softcapping"] = config.final_logit_softcapping
        if any(config.is_sliding(i) for i in range(config.num_layers)):
            keys["attention.sliding_window"] = config.sliding_window
            if arch is GGUFArch.GEMMA3:
                keys["rope.freq_base_swa"] = _or(config.rope_local_theta, config.rope_theta)
    _check_expressible(arch, config, keys.get)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    for key, value in keys.items():
        if key == "attention.sliding_window":
            writer.add_uint32(f"{arch.value}.{key}", int(value))
        else:
            writer.add_float32(f"{arch.value}.{key}", float(value))


def _check_expressible(arch: GGUFArch, config: ModelConfig, get: _Get) -> None:
    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"RoPE scaling {kind!r} is not written to GGUF yet (linear only)")
    if arch is GGUFArch.QWEN2 and config.head_dim * config.num_heads != config.hidden_size:
        raise ValueError(f"llama.cpp's qwen2 architecture cannot hold this model: it sizes q/k/v by "
                         f"hidden_size {config.hidden_size}, the model's heads are {config.num_heads} x "
                         f"{config.head_dim}")
    read = _attention(arch, config.num_layers, config.hidden_size, config.num_heads, config.head_dim, get)
    sliding = tuple(config.is_sliding(i) for i in range(config.num_layers))
    ours = dict(query_pre_attn_scalar=_or(config.query_pre_attn_scalar, float(config.head_dim)),
                attn_logit_softcapping=config.attn_logit_softcapping,
                final_logit_softcapping=config.final_logit_softcapping,
                sliding_layers=sliding if any(sliding) else ())
    theirs = dict(read, query_pre_attn_scalar=_or(read["query_pre_attn_scalar"], float(config.head_dim)))
    for name, value in ours.items():
        if theirs[name] != value:
            raise ValueError(f"llama.cpp's {arch.value} architecture cannot hold this model: it would read "
                             f"{name} as {theirs[name]}, the model has {value}")


def _rope_scaling(get: _Get) -> dict[str, Any] | None:
    kind = _or(get("rope.scaling.type"), "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported (linear only)")
    factor = get("rope.scaling.factor")
    if factor is None:
        raise ValueError("GGUF rope scaling linear without rope.scaling.factor")
    return {"rope_type": "linear", "factor": float(factor)}


def _llama3_factors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Per-dimension divisors of the RoPE frequencies, as llama.cpp's converter computes them."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, medium))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """Llama 3.1+ GGUFs carry their "llama3" RoPE scaling as a `rope_freqs` tensor of per-dimension
    factors, not as parameters. Recover HF's parameters: the released models all use one of a few
    settings, and a candidate is only taken if it reproduces every factor."""
    if np.allclose(factors, 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for low, high, old in itertools.product((1.0, 2.0), (4.0, 8.0), (8192, 4096, 16384, 32768)):
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": old}
        if np.allclose(_llama3_factors(inv_freq, scaling), factors, rtol=1e-4):
            return scaling
    raise ValueError("rope_freqs in this GGUF matches no llama3 RoPE scaling this engine knows")

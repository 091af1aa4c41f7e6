"""`ModelConfig.from_hf` / `to_hf`: a Hugging Face `config.json` of any served family, read as transformers
reads it, and back.

transformers fills each key a config.json leaves out with its config class's default, and Hub files rely on
it (Gemma 3's `text_config` lists a handful of keys), so `DEFAULTS` holds those classes' defaults (as of
transformers 5.24; tests/engine/weights/test_families_hf_config.py holds them to the classes). A key a
family's class does not have is ignored, as transformers ignores it. Whatever this engine would compute
differently from transformers (an activation, biases, a RoPE variant) is refused with a ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraserve.engine.config import ModelConfig
from loraserve.engine.models.family import Family, family_of
from loraserve.engine.ops.glue import Activation

_LLAMA_SHAPE: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "head_dim": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "rope_theta": 10000.0,
}
_GEMMA_SHAPE: dict[str, Any] = {
    "vocab_size": 256000, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "hidden_size": 2304, "intermediate_size": 9216, "head_dim": 256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
    "attention_bias": False, "use_bidirectional_attention": None, "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
}
_QWEN_SHAPE: dict[str, Any] = {
    **_LLAMA_SHAPE, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
    "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_LLAMA_SHAPE, "intermediate_size": 11008, "num_key_value_heads": None,
              "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False},
    "mistral": {**_LLAMA_SHAPE, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "sliding_window": 4096},
    "gemma": {key: value for key, value in _GEMMA_SHAPE.items()
              if key not in ("hidden_activation", "query_pre_attn_scalar", "sliding_window")}
    | {"hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
       "num_key_value_heads": 16, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {**_GEMMA_SHAPE, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    # Gemma3TextConfig has attn_logit_softcapping too, but its attention never applies it: not read here.
    "gemma3_text": {**_GEMMA_SHAPE, "vocab_size": 262208, "max_position_embeddings": 131072,
                    "final_logit_softcapping": None,
                    "use_bidirectional_attention": False, "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6},
    # Qwen2's class has no head_dim, but its attention takes one a config.json names.
    "qwen2": _QWEN_SHAPE,
    "qwen3": {**_QWEN_SHAPE, "head_dim": 128, "attention_bias": False},
}
# The multimodal wrappers' defaults for the keys of theirs that override their text model's: transformers 5
# ties the head by the wrapper's flag (and Gemma 3's Hub files list the chat EOS ids there).
WRAPPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3": {"tie_word_embeddings": True},
    "mistral3": {"tie_word_embeddings": True},
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ACTIVATIONS = {"silu": Activation.SILU, "swish": Activation.SILU, "gelu_pytorch_tanh": Activation.GELU_TANH}
_HF_ACTIVATION = {Activation.SILU: "silu", Activation.GELU_TANH: "gelu_pytorch_tanh"}
# Gemma (1)'s releases say "gelu" and mean the tanh approximation: transformers' GemmaConfig rewrites it.
_LEGACY_GELU = ("gemma",)
_SLIDING, _FULL = "sliding_attention", "full_attention"
_LAYER_TYPED = ("gemma2", "gemma3_text", "qwen2", "qwen3")  # their models read `layer_types`
_ROPE_TYPES = ("default", "linear", "llama3")
_Get = Callable[[str], Any]  # a config key's value, or the family's default


def text_config(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The text model's config of a multimodal wrapper (Gemma 3, Mistral 3), its own keys applied; None for
    a text model's config."""
    wrapper = str(raw.get("model_type", "llama"))
    if family_of(wrapper).model_type == wrapper:
        return None
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"config.json of a {wrapper} model has no text_config")
    own: dict[str, Any] = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings")
                           if k in raw}
    return {**text, **WRAPPER_DEFAULTS.get(wrapper, {}), **own}


def model_config(raw: dict[str, Any]) -> ModelConfig:
    """`ModelConfig.from_hf`: a text model's config.json, or a multimodal wrapper's, served as its text
    model."""
    text = text_config(raw)
    if text is not None:
        model_type = str(text.get("model_type", family_of(str(raw["model_type"])).model_type))
        return _parse(text, model_type)
    return _parse(raw, str(raw.get("model_type", "llama")))


def _parse(cfg: dict[str, Any], model_type: str) -> ModelConfig:
    family = family_of(model_type)
    defaults = DEFAULTS[family.model_type]

    def get(key: str) -> Any:
        return cfg[key] if key in cfg else defaults[key]

    def option(key: str) -> Any:  # a key this family's transformers config has, else unset
        return get(key) if key in defaults else None

    _check_supported(cfg, family, get, option)
    layers, heads = int(get("num_hidden_layers")), int(get("num_attention_heads"))
    window, sliding = _sliding(cfg, family, layers, get, option)
    max_positions = int(get("max_position_embeddings"))
    theta, scaling, local_theta = _rope(cfg, family, get, max_positions)
    return ModelConfig(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        bos_token_id=None if get("bos_token_id") is None else int(get("bos_token_id")),
        eos_token_ids=_ids(get("eos_token_id")),
        architecture=family.model_type,
        query_pre_attn_scalar=_float_or_none(option("query_pre_attn_scalar")),
        attn_logit_softcapping=_float_or_none(option("attn_logit_softcapping")),
        final_logit_softcapping=_float_or_none(option("final_logit_softcapping")),
        sliding_window=window,
        sliding_layers=sliding,
        rope_local_theta=local_theta,
    )


def _check_supported(cfg: dict[str, Any], family: Family, get: _Get, option: _Get) -> None:
    name = family.model_type
    key = "hidden_activation" if "hidden_activation" in DEFAULTS[name] else "hidden_act"
    act = str(get(key))
    if act == "gelu" and name in _LEGACY_GELU:
        act = "gelu_pytorch_tanh"
    if _ACTIVATIONS.get(act) is not family.activation:
        raise ValueError(f"{name} config.json: {key} {act!r} is not supported "
                         f"({name} is served with {_HF_ACTIVATION[family.activation]})")
    for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if option(flag):
            raise ValueError(f"{name} config.json: {flag} is not supported")
    partial = cfg.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"{name} config.json: partial_rotary_factor {partial} (partial rotary) "
                         "is not supported")


def _sliding(cfg: dict[str, Any], family: Family, layers: int, get: _Get,
             option: _Get) -> tuple[int | None, tuple[bool, ...]]:
    """(sliding_window, sliding_layers) as transformers' masks of that family apply them."""
    name = family.model_type
    window = option("sliding_window")
    if name in ("qwen2", "qwen3") and not get("use_sliding_window"):
        window = None  # Qwen2Config drops the window unless use_sliding_window
    if window is None:
        return None, ()
    if name == "mistral":
        return int(window), ()  # every layer: Mistral's model ignores layer_types
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != layers or not set(types) <= {_SLIDING, _FULL}:
            raise ValueError(f"{name} config.json: layer_types {types} are not {layers} of "
                             f"{_SLIDING!r} / {_FULL!r}")
        sliding = tuple(t == _SLIDING for t in types)
    elif name == "gemma2":
        sliding = tuple(i % 2 == 0 for i in range(layers))  # Gemma2Config: layers 0, 2, ... slide
    elif name == "gemma3_text":
        pattern = int(get("sliding_window_pattern"))  # every pattern-th layer is global
        sliding = tuple((i + 1) % pattern != 0 for i in range(layers))
    else:  # Qwen2/3: the layers from max_window_layers on
        sliding = tuple(i >= int(get("max_window_layers")) for i in range(layers))
    return (int(window), sliding) if any(sliding) else (None, ())


def _rope(cfg: dict[str, Any], family: Family, get: _Get,
          max_positions: int) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_theta) from transformers 5's `rope_parameters` (flat, or per
    layer type) or the older top-level `rope_theta` / `rope_scaling` (/ `rope_local_base_freq`)."""
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling")
    nested = bool(params) and set(params) <= {_SLIDING, _FULL}
    sliding: dict[str, Any] | None
    if family.model_type == "gemma3_text":
        # Gemma3TextConfig: the old keys still apply; rope_scaling is the global (full) layers'.
        full = dict(params.get(_FULL) or {}) if nested else {}
        local = dict(params.get(_SLIDING) or {}) if nested else {}
        full |= legacy or {}
        local.setdefault("rope_theta", get("rope_local_base_freq"))
        sliding = local
    elif nested:
        full, sliding = dict(params.get(_FULL) or {}), dict(params.get(_SLIDING) or {})
    else:  # as PreTrainedConfig: the old rope_scaling wins over rope_parameters
        full, sliding = dict(legacy or params), None
    full.setdefault("rope_theta", get("rope_theta"))
    if sliding is not None:
        sliding.setdefault("rope_theta", full["rope_theta"])
        if _rope_scaling(sliding, family, max_positions) is not None:
            raise ValueError(f"{family.model_type} config.json: RoPE scaling of the sliding layers "
                             f"({sliding}) is not supported")
    local_theta = float(sliding["rope_theta"]) if sliding is not None else None
    return float(full["rope_theta"]), _rope_scaling(full, family, max_positions), local_theta


def _rope_scaling(params: dict[str, Any], family: Family, max_positions: int) -> dict[str, Any] | None:
    """HF's RoPE dict as ModelConfig.rope_scaling keeps it (without the base), None when unscaled."""
    kind = str(params.get("rope_type", params.get("type", "default")))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"{family.model_type} config.json: RoPE type {kind!r} is not supported "
                         f"(supported: {', '.join(_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"{family.model_type} config.json: partial_rotary_factor {partial} (partial rotary) "
                         "is not supported")
    if kind == "default":
        return None
    if "factor" not in params:
        raise ValueError(f"{family.model_type} config.json: RoPE type {kind!r} without a factor")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    scaling["rope_type"] = kind
    if kind == "llama3":  # transformers' default for the pretraining context
        scaling.setdefault("original_max_position_embeddings", max_positions)
    return scaling


def _ids(value: int | list[int] | None) -> tuple[int, ...]:
    return () if value is None else tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """`ModelConfig.to_hf`: the config.json transformers (5.24) builds the same model from."""
    family = family_of(cfg.architecture)
    name = family.model_type
    defaults = DEFAULTS[name]
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[name]],
        "model_type": name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "hidden_activation" if "hidden_activation" in defaults else "hidden_act":
            _HF_ACTIVATION[family.activation],
        "rope_parameters": _hf_rope(cfg, name),
    }
    out |= {flag: False for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention")
            if flag in defaults}
    if "query_pre_attn_scalar" in defaults:
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        # Gemma's configs take an int only
        out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in defaults:
            out[key] = getattr(cfg, key)
        elif getattr(cfg, key) is not None:
            raise ValueError(f"{name} has no {key}")
    return out | _hf_sliding(cfg, name)


def _hf_rope(cfg: ModelConfig, name: str) -> dict[str, Any]:
    full = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    if cfg.rope_local_theta is None and name != "gemma3_text":
        return full
    if name not in _LAYER_TYPED:
        raise ValueError(f"{name} has no RoPE base of its sliding layers")
    local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    return {_FULL: full, _SLIDING: {"rope_type": "default", "rope_theta": local}}


def _hf_sliding(cfg: ModelConfig, name: str) -> dict[str, Any]:
    sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
    if name == "mistral":  # a window on every layer or none; None said, MistralConfig's default is 4096
        if any(sliding) and not all(sliding):
            raise ValueError("mistral has no sliding window on some layers only")
        return {"sliding_window": cfg.sliding_window}
    if name not in _LAYER_TYPED:
        if any(sliding):
            raise ValueError(f"{name} has no sliding window")
        return {}
    types = [_SLIDING if s else _FULL for s in sliding]
    # A window no layer uses still has to be a number for Gemma's masks.
    out: dict[str, Any] = {"layer_types": types,
                           "sliding_window": cfg.sliding_window or cfg.max_position_embeddings}
    if name in ("qwen2", "qwen3"):
        out |= {"use_sliding_window": any(sliding), "max_window_layers": sum(not s for s in sliding)}
    return out

"""`ModelConfig.from_hf` / `to_hf` for every family, against transformers' own reading: config.json files as
the Hub has them (transformers 4.x keys, Gemma 3's sparse `text_config`, the multimodal wrappers), the
defaults transformers fills in, what `to_hf` gives back, and what is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, GemmaConfig

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.hf_config import DEFAULTS, WRAPPER_DEFAULTS

from hf_family_helpers import CONFIGS, assert_means_the_same

# config.json files as the Hub has them (transformers 4.x wrote most; Gemma 3's and Mistral 3's wrappers
# list a handful of text_config keys and leave the rest to transformers' defaults), and "qwen2-sliding": a
# Qwen2 turning its window on as older files do (no layer_types: the layers from max_window_layers on).
HUB: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "hub_configs.json").read_text())


def _transformers(raw: dict[str, Any]) -> Any:
    """transformers' model of a config.json, on the meta device (no memory for the weights)."""
    config = CONFIG_MAPPING[raw["model_type"]](**json.loads(json.dumps(raw)))
    with torch.device("meta"):
        return getattr(transformers, raw["architectures"][0])._from_config(config)


@pytest.mark.parametrize("name", list(HUB))
def test_hub_config_means_what_transformers_builds(name: str) -> None:
    cfg = ModelConfig.from_hf(HUB[name])
    assert_means_the_same(cfg, _transformers(HUB[name]))


def test_hub_configs_details() -> None:
    """What the modules above do not show: token ids, and the values a sparse config leaves to defaults."""
    gemma3 = ModelConfig.from_hf(HUB["gemma-3-4b-it"])
    assert gemma3.architecture == "gemma3_text" and gemma3.eos_token_ids == (1, 106)
    assert (gemma3.vocab_size, gemma3.num_heads, gemma3.num_kv_heads, gemma3.head_dim) == (262208, 8, 4, 256)
    assert gemma3.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert gemma3.rope_local_theta == 10000.0
    assert [gemma3.is_sliding(i) for i in range(6)] == [True] * 5 + [False] and gemma3.tie_word_embeddings
    mistral = ModelConfig.from_hf(HUB["mistral-small-3.1-24b-instruct"])
    assert mistral.architecture == "mistral" and mistral.sliding_window is None
    assert (mistral.bos_token_id, mistral.eos_token_ids) == (1, (2,))
    # Tied by Mistral3Config's default: the checkpoint's own head unties it at load (test_families_hf.py).
    assert mistral.tie_word_embeddings
    qwen = ModelConfig.from_hf(HUB["qwen2.5-coder-32b-instruct"])
    assert qwen.sliding_window is None and qwen.bos_token_id == 151643 and qwen.eos_token_ids == (151645,)
    assert ModelConfig.from_hf(HUB["mistral-7b-v0.1"]).sliding_layers == ()  # every layer
    assert ModelConfig.from_hf(HUB["gemma-7b-it"]).query_pre_attn_scalar is None


def _class_default(cls: Any, key: str) -> Any:
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    if key == "rope_theta":
        theta = cls.default_theta
        return theta["global"] if isinstance(theta, dict) else theta
    if key == "rope_local_base_freq":
        return cls.default_theta["local"]
    if key == "sliding_window_pattern":  # the class computes its layer types from it
        types = cls(num_hidden_layers=12).layer_types
        return next(i + 1 for i, t in enumerate(types) if t == "full_attention")
    return fields.get(key)


# Keys of transformers' classes deliberately absent from DEFAULTS: never applied by the model.
_UNREAD = {("gemma3_text", "attn_logit_softcapping")}
_OPTIONS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
            "use_sliding_window", "max_window_layers", "attention_bias", "mlp_bias",
            "use_bidirectional_attention", "head_dim", "hidden_act", "hidden_activation")


@pytest.mark.parametrize("model_type", list(DEFAULTS))
def test_defaults_are_transformers(model_type: str) -> None:
    cls = CONFIG_MAPPING[model_type]
    for key, value in DEFAULTS[model_type].items():
        assert value == _class_default(cls, key), key
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in _OPTIONS:
        # Qwen2's attention takes a head_dim its class does not declare.
        declared = key in fields or (model_type, key) == ("qwen2", "head_dim")
        assert declared == (key in DEFAULTS[model_type] or (model_type, key) in _UNREAD), key


@pytest.mark.parametrize("wrapper", list(WRAPPER_DEFAULTS))
def test_wrapper_defaults_are_transformers(wrapper: str) -> None:
    for key, value in WRAPPER_DEFAULTS[wrapper].items():
        assert value == _class_default(CONFIG_MAPPING[wrapper], key), key


@pytest.mark.parametrize("name", [*CONFIGS, *HUB])
def test_to_hf_is_the_same_model_to_transformers(name: str) -> None:
    raw = CONFIGS[name]().to_dict() if name in CONFIGS else HUB[name]
    cfg = ModelConfig.from_hf(raw)
    if name.startswith("mistral-small"):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)  # as its checkpoint makes it
    out = cfg.to_hf()
    assert ModelConfig.from_hf(out) == cfg
    model = _transformers(out)
    assert_means_the_same(cfg, model)
    assert ModelConfig.from_hf(model.config.to_dict()) == cfg  # and as transformers saves it again


def test_llama_defaults_round_trip() -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert_means_the_same(cfg, _transformers(cfg.to_hf()))


def test_gemma_gelu_is_tanh_as_transformers_reads_it() -> None:
    assert GemmaConfig(hidden_act="gelu").hidden_act == "gelu_pytorch_tanh"
    assert ModelConfig.from_hf(HUB["gemma-7b-it"]).architecture == "gemma"


_SLIDING_SCALED = {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0},
                   "full_attention": {"rope_type": "default", "rope_theta": 100.0}}


@pytest.mark.parametrize(("name", "change", "message"), [
    ("gemma2", {"hidden_activation": "gelu"},
     r"gemma2 config\.json: hidden_activation 'gelu' is not supported "
     r"\(gemma2 is served with gelu_pytorch_tanh\)"),
    ("gemma3_text", {"hidden_activation": "relu"}, r"hidden_activation 'relu' is not supported"),
    ("qwen2", {"hidden_act": "gelu_pytorch_tanh"}, r"qwen2 config\.json: hidden_act 'gelu_pytorch_tanh'"),
    ("mistral", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     r"RoPE type 'yarn' is not supported \(supported: default, linear, llama3\)"),
    ("qwen2", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"RoPE type 'dynamic'"),
    ("qwen3", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor 0\.5 \(partial rotary\)"),
    ("mistral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                     "partial_rotary_factor": 0.25}}, r"partial_rotary_factor 0\.25"),
    ("gemma", {"attention_bias": True}, r"gemma config\.json: attention_bias is not supported"),
    ("gemma3_text", {"use_bidirectional_attention": True}, r"use_bidirectional_attention is not supported"),
    ("gemma2", {"layer_types": ["chunked_attention"] * 4}, r"layer_types \['chunked_attention'"),
    ("gemma2", {"layer_types": ["full_attention"]}, r"are not 4 of"),
    ("gemma3_text", {"rope_parameters": _SLIDING_SCALED}, r"RoPE scaling of the sliding layers"),
    ("gemma3_text", {"model_type": "gpt2"}, r"'gpt2' is not served by this engine"),
    ("gemma3", {"text_config": None}, r"a gemma3 model has no text_config"),
    ("mistral3", {"text_config": {"model_type": "ministral3"}}, r"'ministral3' is not served"),
])
def test_refused_with_what_is_not_supported(name: str, change: dict[str, Any], message: str) -> None:
    raw = {**CONFIGS[name]().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(raw)

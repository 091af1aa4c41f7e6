"""loraserve.peft: PEFT's names and config fields, read one way by the registry and the engine alike."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loraserve import types
from loraserve.engine.config import ModelConfig
from loraserve.engine.config import module_name as engine_module_name
from loraserve.engine.lora.adapter_file import load_adapter
from loraserve.engine.models.family import FAMILIES, family_of
from loraserve.errors import InvalidFinetune
from loraserve.peft import (
    LORA_TARGETS,
    MODEL_TYPE_ALIASES,
    WORKERS_AI_MODEL_TYPES,
    KeyFault,
    LoraFactor,
    LoraScaling,
    PatternTable,
    TensorKey,
    TensorKeyError,
    accepted_model_types,
    canonical_model_type,
    is_targeted,
    model_type_matches,
    module_name,
    parse_tensor_key,
)
from loraserve.registry import synth
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.validate import parse_adapter_config, validate_safetensors
from loraserve.types import AdapterRef

# 2 layers; q (16, 16), k/v (16, 8), o (16, 16), gate/up (16, 32), down (32, 16)
BASE = synth.llama_model_info()
CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=4)
LIMITS = RegistryLimits(max_rank=8)
Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def test_names() -> None:
    assert types.LORA_TARGETS == LORA_TARGETS
    assert module_name(3, "q_proj") == "model.layers.3.self_attn.q_proj"
    assert module_name(0, "down_proj") == "model.layers.0.mlp.down_proj"
    assert engine_module_name is module_name
    assert CFG.lora_shapes() == BASE.lora_shapes  # the agreement test below needs one model for both


@pytest.mark.parametrize(("key", "expected"), [
    (Q_A, TensorKey(1, "q_proj", LoraFactor.A)),
    ("model.layers.0.mlp.down_proj.lora_B.weight", TensorKey(0, "down_proj", LoraFactor.B)),
    # PeftModel.from_pretrained loads a key still holding the adapter name only under "default"
    (Q_A.replace(".weight", ".default.weight"), TensorKey(1, "q_proj", LoraFactor.A)),
    (Q_A.replace(".weight", ".other.weight"), KeyFault.NOT_LORA),
    (Q_A.replace(".weight", ".default.default.weight"), KeyFault.NOT_LORA),
    (Q_A.replace("lora_A", "lora_a"), KeyFault.NOT_LORA),
    (Q_A.replace("layers.1", "layers.01"), KeyFault.NOT_LORA),
    ("base_model.model." + Q_A, KeyFault.NOT_LORA),
    ("x." + Q_A.removeprefix("base_model.model."), KeyFault.NOT_LORA),
    (Q_A + ".extra", KeyFault.NOT_LORA),
    (Q_A.replace("self_attn", "mlp"), KeyFault.UNKNOWN_MODULE),
    (Q_A.replace("q_proj", "qkv_proj"), KeyFault.UNKNOWN_MODULE),
    (Q_A.replace("layers.1", "layers.2"), KeyFault.NO_SUCH_LAYER),
])
def test_tensor_keys(key: str, expected: TensorKey | KeyFault) -> None:
    if isinstance(expected, TensorKey):
        assert parse_tensor_key(key, LORA_TARGETS, 2) == expected
        return
    with pytest.raises(TensorKeyError) as info:
        parse_tensor_key(key, LORA_TARGETS, 2)
    assert info.value.fault is expected and info.value.key == key
    if expected is KeyFault.UNKNOWN_MODULE:
        assert info.value.module.endswith("proj") and info.value.layer == 1


def test_a_projection_the_model_lacks_is_unknown() -> None:
    with pytest.raises(TensorKeyError) as info:
        parse_tensor_key(Q_A, ("k_proj", "v_proj"), 2)
    assert info.value.fault is KeyFault.UNKNOWN_MODULE and info.value.module == "self_attn.q_proj"
    assert LoraFactor.A.other is LoraFactor.B and LoraFactor.B.other is LoraFactor.A


def _peft_targets(target_modules: str | list[str], name: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    config = SimpleNamespace(target_modules=target_modules, exclude_modules=None, modules_to_save=None,
                             target_parameters=None, layers_to_transform=None, layers_pattern=None)
    return bool(check_target_module_exists(config, name))


@pytest.mark.parametrize("targets", [
    ["q_proj"], ["self_attn.v_proj", "up_proj"], ["layers.1.mlp.down_proj"], ["proj"], ["attn.q_proj"],
    ["model.layers.0.self_attn.q_proj"], r".*\.(q|v)_proj", r"model\.layers\.1\..*", "q_proj",
])
def test_target_matching_is_peft_s(targets: str | list[str]) -> None:
    for layer in range(2):
        for target in LORA_TARGETS:
            name = module_name(layer, target)
            assert is_targeted(targets, name) == _peft_targets(targets, name), (targets, name)


@pytest.mark.parametrize("patterns", [
    {"v_proj": 2, "q_proj": 3}, {"model.layers.1.self_attn.q_proj": 8, "q_proj": 2},
    {"q_proj": 2, "model.layers.1.self_attn.q_proj": 8}, {"mlp.down_proj": 5},
    {"base_model.model.model.layers.1.self_attn.q_proj": 9},
    {"layers.1.mlp.up_proj": 7, "attn.q_proj": 6}, {r"layers\.0\..*_proj": 4},
])
def test_pattern_lookup_is_peft_s(patterns: dict[str, int]) -> None:
    """First match in the file's order, a regex over the end of the name without PeftModel's prefix."""
    from peft.utils.other import get_pattern_key

    for layer in range(2):
        for target in LORA_TARGETS:
            name = module_name(layer, target)
            expected = patterns.get(get_pattern_key(list(patterns), name), 1)
            assert PatternTable(patterns).get(layer, target, 1) == expected, (patterns, name)


def test_scaling() -> None:
    plain = LoraScaling.from_json({"r": 16, "lora_alpha": 8})
    assert plain.scale(0, "q_proj", 16) == 0.5
    rs = LoraScaling.from_json({"r": 16, "lora_alpha": 8, "use_rslora": True,
                                "alpha_pattern": {"v_proj": 32}})
    assert rs.scale(0, "q_proj", 16) == 8 / math.sqrt(16) == 2.0
    assert rs.scale(1, "v_proj", 16) == 32 / 4 and rs.alpha_for(1, "v_proj") == 32.0
    # No lora_alpha (refused at upload): the engine has always fallen back to r.
    assert LoraScaling.from_json({"r": 4}).scale(0, "q_proj", 4) == 1.0


def test_registry_config_and_engine_scaling_agree() -> None:
    raw = synth.adapter_config(4, 12, ("q_proj", "v_proj", "down_proj"), use_rslora=True,
                               alpha_pattern={"model.layers.1.self_attn.v_proj": 3, "down_proj": 40})
    checked = parse_adapter_config(raw, BASE, LIMITS)
    engine = LoraScaling.from_json(json.loads(raw))
    assert checked.scaling == engine
    for layer in range(2):
        for target in LORA_TARGETS:
            assert checked.alpha_for(layer, target) == engine.alpha_for(layer, target)
    assert engine.scale(1, "v_proj", 4) == 3 / 2 and engine.scale(0, "v_proj", 4) == 12 / 2


def test_model_type() -> None:
    assert model_type_matches(None, "llama")  # PEFT does not write it
    assert model_type_matches("LLaMA", "llama")
    assert not model_type_matches("mistral", "llama")
    assert not model_type_matches(["llama"], "llama")


@pytest.mark.parametrize(("model_type", "architecture", "fits"), [
    # a multimodal wrapper and its text decoder are one model to an adapter
    ("gemma3", "gemma3_text", True), ("gemma3_text", "gemma3", True), ("Gemma3", "gemma3", True),
    ("mistral3", "mistral", True), ("mistral", "mistral3", True),
    # Workers AI's family names: "gemma" for every Gemma, as its LoRA docs ask
    ("gemma", "gemma3_text", True), ("gemma", "gemma2", True), ("gemma", "gemma", True),
    ("qwen2", "qwen2", True),
    # other decoders
    ("gemma3", "gemma", False), ("gemma2", "gemma3_text", False), ("llama", "qwen2", False),
    ("qwen2", "llama", False), ("mistral3", "llama", False), ("gemma", "qwen2", False),
])
def test_model_type_aliases(model_type: str, architecture: str, fits: bool) -> None:
    assert model_type_matches(model_type, architecture) is fits


def test_accepted_model_types() -> None:
    assert accepted_model_types("gemma3") == accepted_model_types("gemma3_text") == ("gemma", "gemma3",
                                                                                      "gemma3_text")
    assert accepted_model_types("qwen2") == ("qwen2",) and accepted_model_types("llama") == ("llama",)
    assert canonical_model_type("Mistral3") == "mistral"


def test_aliases_agree_with_the_engine_families() -> None:
    """The registry's table (stdlib) names decoders the engine serves, and the engine reads it too."""
    for name, family in FAMILIES.items():
        assert canonical_model_type(name) == family.model_type, name
    for alias, target in MODEL_TYPE_ALIASES.items():
        assert family_of(alias) is FAMILIES[target]
    for model_type in WORKERS_AI_MODEL_TYPES:
        assert model_type in FAMILIES


def test_head_dim_sets_the_shapes_the_registry_checks() -> None:
    """Gemma's head_dim is its own (256 with hidden 3072 and 16 heads in Gemma 7B): q and o are not square."""
    gemma = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=12, architecture="gemma")
    info = synth.llama_model_info(hidden=16, heads=2, kv_heads=1, head_dim=12, architecture="gemma")
    assert gemma.lora_shapes() == info.lora_shapes
    assert info.lora_shapes["q_proj"] == (16, 24) and info.lora_shapes["o_proj"] == (24, 16)


def test_imports_no_torch() -> None:
    code = "import sys, loraserve.peft; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# The registry accepts exactly the tensor names the engine loads (both parse them with loraserve.peft).

_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
_TRICKY: dict[str, list[str]] = {
    "peft": [_A],
    "no prefix": [_A.removeprefix("base_model.model.")],
    "default": [_A.replace(".weight", ".default.weight")],
    "default, no prefix": [_A.removeprefix("base_model.model.").replace(".weight", ".default.weight")],
    "other adapter name": [_A.replace(".weight", ".other.weight")],
    "two prefixes": ["base_model.model." + _A],
    "prefix of another model": ["transformer." + _A.removeprefix("base_model.model.")],
    "leading zero": [_A.replace("layers.1", "layers.01")],
    "no such layer": [_A.replace("layers.1", "layers.2")],
    "wrong block": [_A.replace("self_attn", "mlp")],
    "twice": [_A, _A.replace(".weight", ".default.weight")],
}


def _write(folder: Path, a_names: list[str]) -> Path:
    rng = np.random.default_rng(0)
    tensors = {}
    for name in a_names:
        tensors[name] = rng.standard_normal((2, 16)).astype(np.float32)
        tensors[name.replace("lora_A", "lora_B")] = rng.standard_normal((16, 2)).astype(np.float32)
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(synth.adapter_config(2, 4, ("q_proj",)))
    (folder / "adapter_model.safetensors").write_bytes(synth.encode_safetensors(tensors))
    return folder


@pytest.mark.parametrize("case", list(_TRICKY))
def test_registry_and_engine_accept_the_same_names(tmp_path: Path, case: str) -> None:
    folder = _write(tmp_path / "a", _TRICKY[case])
    try:
        checked = validate_safetensors(folder / "adapter_model.safetensors", BASE, None, LIMITS)
        registry: set[tuple[int, str]] | None = {(m.layer, m.proj) for m in checked.modules}
    except InvalidFinetune:
        registry = None
    try:
        engine: set[tuple[int, str]] | None = set(load_adapter(AdapterRef(case, str(folder)), CFG,
                                                               torch.float32).modules)
    except ValueError:
        engine = None
    assert registry == engine
    assert (registry is not None) == (case in ("peft", "no prefix", "default", "default, no prefix"))

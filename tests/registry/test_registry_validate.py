"""Adapter validation without a database: every rule, with a crafted file that breaks it."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from loraserve.errors import InvalidFinetune
from loraserve.registry import synth
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.validate import (
    MAX_CONFIG_BYTES,
    AdapterConfig,
    check_against_config,
    parse_adapter_config,
    read_adapter_tensors,
    validate_safetensors,
)
from loraserve.types import LORA_TARGETS, ModelInfo

BASE = synth.llama_model_info()  # q (16, 16), k/v (16, 8), o (16, 16), gate/up (16, 32), down (32, 16)
LIMITS = RegistryLimits(max_rank=8)
A0 = synth.lora_name(0, "q_proj", "A")
B0 = synth.lora_name(0, "q_proj", "B")


def cfg(
    r: int = 4, alpha: float = 8, targets: str | tuple[str, ...] = ("q_proj", "v_proj"), **extra: object
) -> AdapterConfig:
    return parse_adapter_config(synth.adapter_config(r, alpha, targets, **extra), BASE, LIMITS)


def refuses(match: str, data: dict[str, object] | bytes) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    with pytest.raises(InvalidFinetune, match=match) as info:
        parse_adapter_config(raw, BASE, LIMITS)
    assert info.value.code == 3039 and info.value.status == 400


def good_config(**changes: object) -> dict[str, object]:
    config: dict[str, object] = json.loads(synth.adapter_config(4, 8))
    config.update(changes)
    return config


def write(tmp_path: Path, blob: bytes, name: str = "adapter_model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def tensors_file(tmp_path: Path, tensors: Mapping[str, np.ndarray | synth.RawTensor] | None = None) -> Path:
    return write(
        tmp_path, synth.encode_safetensors(tensors if tensors is not None else synth.lora_tensors(BASE, 4))
    )


def refuses_file(path: Path, match: str, config: AdapterConfig | None = None) -> InvalidFinetune:
    with pytest.raises(InvalidFinetune, match=match) as info:
        validate_safetensors(path, BASE, config, LIMITS)
    return info.value


# adapter_config.json


def test_config_parses_peft_fields() -> None:
    c = cfg(
        r=4,
        alpha=16,
        targets=("q_proj", "self_attn.v_proj"),
        use_rslora=True,
        model_type="llama",
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 8},
        alpha_pattern={"q_proj": 3.5},
        layers_to_transform=[1, 0],
    )
    assert (c.r, c.lora_alpha, c.use_rslora, c.model_type) == (4, 16.0, True, "llama")
    assert c.target_modules == ("q_proj", "self_attn.v_proj")
    assert c.layers_to_transform == (0, 1)
    assert c.rank_for(0, "v_proj") == 2 and c.rank_for(1, "q_proj") == 8 and c.rank_for(0, "q_proj") == 4
    assert c.alpha_for(0, "q_proj") == 3.5 and c.alpha_for(0, "v_proj") == 16.0
    assert c.targets(0, "v_proj") and not c.targets(0, "k_proj")
    assert c.max_rank == 8


def test_config_lenient_model_type_and_string_targets() -> None:
    config = good_config(target_modules="all-linear")
    assert "model_type" not in config  # PEFT does not write it; Workers AI wants it; infer it
    c = parse_adapter_config(json.dumps(config).encode(), BASE, LIMITS)
    assert c.model_type == "llama"
    assert c.target_modules == LORA_TARGETS
    assert cfg(targets="q_proj").target_modules == ("q_proj",)
    assert cfg(model_type="LLAMA").model_type == "llama"


@pytest.mark.parametrize(
    ("match", "data"),
    [
        ("not valid UTF-8 JSON", b"{not json"),
        ("not valid UTF-8 JSON", b"\xff\xfe{}"),
        ("not valid UTF-8 JSON", b"[" * 100_000),
        ("expected a JSON object", b"[1, 2]"),
        ("expected at most", b" " * (MAX_CONFIG_BYTES + 1)),
        ("peft_type", good_config(peft_type="IA3")),
        ("r must be an integer in 1..8, found 9", good_config(r=9)),
        ("r must be an integer", good_config(r=0)),
        ("r must be an integer", good_config(r=4.0)),
        ("r must be an integer", good_config(r=True)),
        ("r is required", {k: v for k, v in good_config().items() if k != "r"}),
        ("lora_alpha must be a finite number", good_config(lora_alpha=0)),
        ("lora_alpha must be a finite number", good_config(lora_alpha="8")),
        ("lora_alpha must be a finite number", b'{"r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}'),
        (
            "lora_alpha must be a finite number",
            b'{"r": 4, "lora_alpha": Infinity, "target_modules": ["q_proj"]}',
        ),
        ("lora_alpha is required", {"r": 4, "target_modules": ["q_proj"]}),
        ("target_modules is required", {"r": 4, "lora_alpha": 8}),
        (
            "target_modules: unknown module 'embed_tokens'",
            good_config(target_modules=["q_proj", "embed_tokens"]),
        ),
        ("regular expressions are not supported", good_config(target_modules=".*(q|v)_proj$")),
        ("regular expressions are not supported", good_config(target_modules=["q_proj", 3])),
        ("target_modules must be a non-empty list", good_config(target_modules=[])),
        ("bias must be 'none'", good_config(bias="all")),
        ("DoRA .use_dora. is not supported", good_config(use_dora=True)),
        ("fan_in_fan_out must be false", good_config(fan_in_fan_out=True)),
        ("modules_to_save is not supported", good_config(modules_to_save=["lm_head"])),
        ("lora_bias is not supported", good_config(lora_bias=True)),
        ("trainable_token_indices", good_config(trainable_token_indices=[1, 2])),
        ("model_type must be 'llama'", good_config(model_type="gemma")),
        ("layers_to_transform must be layer indices in 0..1", good_config(layers_to_transform=[0, 2])),
        ("layers_to_transform must be layer indices", good_config(layers_to_transform=[-1])),
        ("layers_to_transform must not be empty", good_config(layers_to_transform=[])),
        (
            r"rank_pattern\['v_proj'\] must be an integer in 1..8, found 16",
            good_config(rank_pattern={"v_proj": 16}),
        ),
        ("rank_pattern entries must be module names", good_config(rank_pattern={"(a+)+$": 2})),
        ("rank_pattern must be an object", good_config(rank_pattern=[2])),
        (r"alpha_pattern\['q_proj'\] must be a finite number", good_config(alpha_pattern={"q_proj": -1})),
        ("use_rslora must be a boolean", good_config(use_rslora="yes")),
    ],
)
def test_config_refusals_name_the_field(match: str, data: dict[str, object] | bytes) -> None:
    refuses(match, data)


# adapter_model.safetensors: accepted files


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_reads_files_written_by_the_safetensors_library(tmp_path: Path, prefix: str) -> None:
    tensors = {
        k.removeprefix("base_model.model.") if not prefix else k: v
        for k, v in synth.lora_tensors(BASE, 4, targets=("q_proj", "down_proj")).items()
    }
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    t = validate_safetensors(tmp_path / "a.safetensors", BASE, cfg(targets=("q_proj", "down_proj")), LIMITS)
    assert [(m.layer, m.proj, m.rank) for m in t.modules] == [
        (0, "q_proj", 4),
        (0, "down_proj", 4),
        (1, "q_proj", 4),
        (1, "down_proj", 4),
    ]
    assert t.metadata == {"format": "pt"}
    assert t.modules[1].a.shape == (4, 32) and t.modules[1].b.shape == (16, 4)


def test_accepts_f16_bf16_and_default_adapter_name(tmp_path: Path) -> None:
    f32 = synth.lora_tensors(BASE, 2, targets=("k_proj",))
    mixed: dict[str, np.ndarray | synth.RawTensor] = {}
    for i, (name, arr) in enumerate(f32.items()):
        name = name.replace(".weight", ".default.weight") if i % 2 else name
        mixed[name] = synth.bf16(arr) if i < 2 else arr.astype(np.float16)
    t = validate_safetensors(tensors_file(tmp_path, mixed), BASE, cfg(r=2, targets=("k_proj",)), LIMITS)
    assert sorted(x.dtype for x in t.tensors) == ["BF16", "BF16", "F16", "F16"]


def test_rank_pattern_and_layers_to_transform_cross_check(tmp_path: Path) -> None:
    tensors = synth.lora_tensors(BASE, 4, targets=("q_proj", "v_proj"), layers=[1], ranks={"v_proj": 2})
    config = cfg(r=4, rank_pattern={"v_proj": 2}, layers_to_transform=[1])
    validate_safetensors(tensors_file(tmp_path, tensors), BASE, config, LIMITS)
    refuses_file(
        tmp_path / "adapter_model.safetensors", r"has rank 2, expected 4", cfg(r=4, layers_to_transform=[1])
    )
    refuses_file(
        tmp_path / "adapter_model.safetensors",
        "layers_to_transform",
        cfg(r=4, rank_pattern={"v_proj": 2}, layers_to_transform=[0]),
    )


# adapter_model.safetensors: refusals, each naming what was expected and found


def test_truncated_file(tmp_path: Path) -> None:
    blob = synth.encode_safetensors(synth.lora_tensors(BASE, 4))
    refuses_file(write(tmp_path, blob[:5]), "too short")
    refuses_file(write(tmp_path, blob[:-1]), "data_offsets end .* is beyond the data region")


def test_header_length_beyond_file_and_limit(tmp_path: Path) -> None:
    blob = synth.encode_safetensors(synth.lora_tensors(BASE, 4))
    refuses_file(write(tmp_path, struct.pack("<Q", len(blob)) + blob[8:]), "exceeds the file")
    refuses_file(write(tmp_path, struct.pack("<Q", 2**63) + blob[8:]), "exceeds the limit")


def test_header_not_json_or_not_object(tmp_path: Path) -> None:
    refuses_file(write(tmp_path, struct.pack("<Q", 4) + b"{{{{"), "header is not valid UTF-8 JSON")
    refuses_file(write(tmp_path, synth.raw_safetensors([1], b"")), "header must be a JSON object")  # type: ignore[arg-type]
    refuses_file(write(tmp_path, synth.raw_safetensors({}, b"")), "no tensors")
    refuses_file(write(tmp_path, synth.raw_safetensors({"__metadata__": {"a": 1}}, b"")), "__metadata__")
    refuses_file(write(tmp_path, synth.raw_safetensors({"__metadata__": []}, b"")), "__metadata__")


def _two(
    a_entry: Mapping[str, object], b_entry: Mapping[str, object] | None = None, data: bytes = bytes(128)
) -> bytes:
    b = b_entry or {"dtype": "F32", "shape": [16, 1], "data_offsets": [64, 128]}
    return synth.raw_safetensors({A0: a_entry, B0: b}, data)


def test_offsets_overlap_out_of_range_and_size_mismatch(tmp_path: Path) -> None:
    a = {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]}
    validate_safetensors(write(tmp_path, _two(a)), BASE, None, LIMITS)  # the control: this one is fine
    overlap = {"dtype": "F32", "shape": [1, 16], "data_offsets": [32, 96]}
    err = refuses_file(write(tmp_path, _two(overlap)), r"overlap tensor")
    assert A0 in err.message and B0 in err.message
    refuses_file(write(tmp_path, _two({**a, "data_offsets": [200, 264]})), "beyond the data region")
    refuses_file(write(tmp_path, _two({**a, "data_offsets": [64, 0]})), "0 <= begin <= end")
    refuses_file(write(tmp_path, _two({**a, "data_offsets": [-64, 0]})), "data_offsets must be")
    refuses_file(write(tmp_path, _two({**a, "data_offsets": [0, 60]})), r"span 60 bytes, expected 64")
    refuses_file(write(tmp_path, _two({**a, "shape": [1, -16]})), "shape must be a list of non-negative")
    refuses_file(write(tmp_path, _two({**a, "shape": "1x16"})), "shape must be a list")


@pytest.mark.parametrize("dtype", ["F64", "I8", "U8", "F8_E4M3", None])
def test_unknown_dtype(tmp_path: Path, dtype: str | None) -> None:
    entry = {"dtype": dtype, "shape": [1, 16], "data_offsets": [0, 64]}
    refuses_file(write(tmp_path, _two(entry)), rf"tensor '{A0}': dtype .* is not supported")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_nan_and_inf_in_every_dtype(tmp_path: Path, bad: float, dtype: str) -> None:
    tensors: dict[str, np.ndarray | synth.RawTensor] = dict(synth.lora_tensors(BASE, 4))
    b = synth.lora_tensors(BASE, 4)[B0]
    b[3, 2] = bad
    tensors[B0] = synth.bf16(b) if dtype == "BF16" else b.astype(np.float16 if dtype == "F16" else np.float32)
    err = refuses_file(tensors_file(tmp_path, tensors), "found NaN or Inf at element 14")
    assert B0 in err.message


def test_largest_finite_values_pass(tmp_path: Path) -> None:
    tensors: dict[str, np.ndarray | synth.RawTensor] = dict(synth.lora_tensors(BASE, 4))
    tensors[B0] = np.full((16, 4), np.finfo(np.float16).max, dtype=np.float16)
    validate_safetensors(tensors_file(tmp_path, tensors), BASE, None, LIMITS)


def test_wrong_shapes_name_expected_and_found(tmp_path: Path) -> None:
    tensors = synth.lora_tensors(BASE, 4)
    tensors[A0] = np.zeros((4, 17), np.float32)
    refuses_file(
        tensors_file(tmp_path, tensors),
        rf"tensor '{A0}': expected shape \[r, 16\] with r >= 1, found \[4, 17\]",
    )
    tensors = synth.lora_tensors(BASE, 4)
    tensors[B0] = np.zeros((16, 3), np.float32)
    refuses_file(
        tensors_file(tmp_path, tensors), rf"tensor '{B0}': expected shape \[16, 4\], found \[16, 3\]"
    )
    tensors = synth.lora_tensors(BASE, 4)
    tensors[A0] = np.zeros((4, 4, 4), np.float32)
    refuses_file(tensors_file(tmp_path, tensors), r"found \[4, 4, 4\]")


@pytest.mark.parametrize(
    "extra",
    [
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.0.input_layernorm.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight",
    ],
)
def test_extra_tensor_is_refused_by_name(tmp_path: Path, extra: str) -> None:
    tensors = synth.lora_tensors(BASE, 4)
    tensors[extra] = np.zeros((16,), np.float32)
    err = refuses_file(tensors_file(tmp_path, tensors), "is not a LoRA weight of a decoder layer")
    assert extra in err.message


def test_unknown_module_layer_and_duplicates(tmp_path: Path) -> None:
    tensors = synth.lora_tensors(BASE, 4)
    tensors["base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"] = tensors[A0]
    refuses_file(tensors_file(tmp_path, tensors), r"unknown module mlp.q_proj")
    tensors = synth.lora_tensors(BASE, 4, layers=[0, 2])
    refuses_file(tensors_file(tmp_path, tensors), r"layer 2 does not exist; the base model has layers 0..1")
    tensors = synth.lora_tensors(BASE, 4)
    tensors[A0.removeprefix("base_model.model.")] = tensors[A0]
    refuses_file(tensors_file(tmp_path, tensors), "duplicates tensor")


def test_missing_a_or_b(tmp_path: Path) -> None:
    tensors = synth.lora_tensors(BASE, 4)
    del tensors[B0]
    refuses_file(tensors_file(tmp_path, tensors), rf"tensor '{A0}' has no matching lora_B tensor")
    tensors = synth.lora_tensors(BASE, 4)
    del tensors[A0]
    refuses_file(tensors_file(tmp_path, tensors), rf"tensor '{B0}' has no matching lora_A tensor")


def test_rank_over_limit(tmp_path: Path) -> None:
    path = tensors_file(tmp_path, synth.lora_tensors(BASE, 9))
    refuses_file(path, "rank 9 exceeds the limit of 8")
    validate_safetensors(path, BASE, None, RegistryLimits(max_rank=9))


def test_cross_check_against_config(tmp_path: Path) -> None:
    path = tensors_file(tmp_path, synth.lora_tensors(BASE, 4, targets=("q_proj", "v_proj")))
    tensors = read_adapter_tensors(path, BASE, LIMITS)
    check_against_config(tensors, cfg())
    with pytest.raises(InvalidFinetune, match=r"has rank 4, expected 2"):
        check_against_config(tensors, cfg(r=2))
    with pytest.raises(
        InvalidFinetune, match=r"adapts model.layers.0.self_attn.v_proj, which target_modules"
    ):
        check_against_config(tensors, cfg(targets=("q_proj",)))
    with pytest.raises(InvalidFinetune, match=r"target_modules lists 'k_proj' but no tensor adapts it"):
        check_against_config(tensors, cfg(targets=("q_proj", "v_proj", "k_proj")))


# Per family: model_type, Gemma's head_dim, and biases (Qwen2's q/k/v biases are the base model's own)

# Gemma's head_dim is not hidden / heads: q (16, 24), o (24, 16).
GEMMA = synth.llama_model_info(hidden=16, heads=2, kv_heads=1, head_dim=12, architecture="gemma")
GEMMA3 = synth.llama_model_info(architecture="gemma3_text")
QWEN2 = synth.llama_model_info(architecture="qwen2")


def parse_for(base: ModelInfo, **changes: object) -> AdapterConfig:
    return parse_adapter_config(json.dumps(good_config(**changes)).encode(), base, LIMITS)


@pytest.mark.parametrize(
    ("base", "model_type"),
    [(GEMMA3, "gemma"), (GEMMA3, "gemma3"), (GEMMA3, "Gemma3_Text"), (GEMMA, "gemma"), (QWEN2, "qwen2"),
     (synth.llama_model_info(architecture="mistral3"), "mistral")],
)
def test_model_type_of_each_family(base: ModelInfo, model_type: str) -> None:
    assert parse_for(base, model_type=model_type).model_type == base.architecture
    assert parse_for(base).model_type == base.architecture  # absent: inferred from the base model


@pytest.mark.parametrize(
    ("base", "model_type", "match"),
    [
        (QWEN2, "llama", "model_type must be 'qwen2' for this base model, found 'llama'"),
        (GEMMA3, "llama", "must be 'gemma' or 'gemma3' or 'gemma3_text' for this base model, found 'llama'"),
        (GEMMA, "gemma3", "must be 'gemma' for this base model, found 'gemma3'"),
    ],
)
def test_model_type_of_another_family_is_refused(base: ModelInfo, model_type: str, match: str) -> None:
    with pytest.raises(InvalidFinetune, match=match) as info:
        parse_for(base, model_type=model_type)
    assert info.value.code == 3039


def test_gemma_shapes_follow_head_dim(tmp_path: Path) -> None:
    config = parse_for(GEMMA, model_type="gemma", target_modules=["q_proj", "o_proj"])
    good = synth.lora_tensors(GEMMA, 4, targets=("q_proj", "o_proj"))
    checked = validate_safetensors(tensors_file(tmp_path, good), GEMMA, config, LIMITS)
    assert {(m.proj, m.b.shape) for m in checked.modules} == {("q_proj", (24, 4)), ("o_proj", (16, 4))}
    # An adapter made as if head_dim were hidden / heads (q square) belongs to some other model.
    square = synth.lora_tensors(BASE, 4, targets=("q_proj",))
    with pytest.raises(InvalidFinetune, match=rf"tensor '{B0}': expected shape \[24, 4\], found \[16, 4\]"):
        validate_safetensors(tensors_file(tmp_path, square), GEMMA, None, LIMITS)


@pytest.mark.parametrize(("field", "value"), [("bias", "all"), ("bias", "lora_only"), ("lora_bias", True)])
def test_bias_options_are_refused_naming_why(field: str, value: object) -> None:
    with pytest.raises(InvalidFinetune, match=r"no bias terms .*Qwen2's q/k/v ones.* not LoRA targets"):
        parse_for(QWEN2, **{field: value})


@pytest.mark.parametrize("suffix", ["lora_B.bias", "bias", "base_layer.bias"])
def test_bias_tensors_are_refused_naming_why(tmp_path: Path, suffix: str) -> None:
    tensors: dict[str, np.ndarray] = synth.lora_tensors(QWEN2, 4)
    name = B0.replace("lora_B.weight", suffix)
    tensors[name] = np.zeros((16,), np.float32)
    with pytest.raises(InvalidFinetune, match=r"is a bias: only lora_A/lora_B weight matrices") as info:
        validate_safetensors(tensors_file(tmp_path, tensors), QWEN2, None, LIMITS)
    assert name in info.value.message

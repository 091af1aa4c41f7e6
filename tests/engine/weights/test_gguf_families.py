"""GGUF files of the Gemma and Qwen families (llama.cpp's gemma, gemma2, gemma3, qwen2, qwen3): a tiny random
transformers model of each, saved as a Hugging Face directory, written by our writer (`loraserve quantize`)
and read back by our loader; when llama-cpp-python is installed, llama.cpp itself reads each file and its
logits match transformers', which holds the writer to llama.cpp's conventions (tensor names, Gemma's norms
stored as 1 + w, q/k rows unpermuted for NEOX RoPE, the sliding layers and scales llama.cpp derives)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import Unigram
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from loraserve.engine.config import EngineConfig, ModelConfig, Quantization
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.loader import load_engine
from loraserve.engine.weights.convert import convert
from loraserve.engine.weights.gguf_file import load_gguf
from loraserve.engine.weights.gguf_writer import PlannedTensor, write_gguf
from loraserve.engine.weights.hf import hf_tensors
from loraserve.engine.weights.quantize import load_hf_quantized
from loraserve.engine.weights.tokenizer import Tokenizer

from engine_helpers import hf_logits
from gguf_helpers import (
    GEMMA_SPECIALS,
    train_gemma_sentencepiece,
    write_gemma_tokenizer,
    write_qwen2_tokenizer,
)
from quantize_helpers import assert_same_weights, prompt_logits

# Rows of 64 and 128: whole Q8_0 / Q4_0 blocks. head_dim 32 is not hidden / heads (16).
SHAPE: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                             rms_norm_eps=1e-6)
EAGER: dict[str, Any] = dict(attn_implementation="eager")  # transformers' sliding masks
WINDOW = 8  # shorter than the prompt: sliding layers drop what global layers still read
GEMMA_VOCAB = 416  # the sentencepiece model's 400 pieces, then rows no token uses
QWEN_VOCAB = 288  # 256 bytes, 2 merges, 3 special tokens, then unused rows
PROMPT = torch.randint(6, 258, (40,), generator=torch.Generator().manual_seed(5)).tolist()
TEXTS = ["Hello, world!", "hello  123 4567\n\n the fox", "你好 café naïve\tx", "  two  spaces "]


def gemma() -> Any:  # GeGLU, tied head, norms stored as 1 + w
    return GemmaForCausalLM(GemmaConfig(vocab_size=GEMMA_VOCAB, num_hidden_layers=2, bos_token_id=2,
                                        eos_token_id=[1, 5], pad_token_id=0, **SHAPE))


def gemma2() -> Any:  # sandwich norms, soft-caps, every other layer sliding
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=GEMMA_VOCAB, num_hidden_layers=3, query_pre_attn_scalar=32, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, sliding_window=WINDOW, bos_token_id=2, eos_token_id=[1, 5],
        pad_token_id=0, **EAGER, **SHAPE))


def gemma3() -> Any:  # q/k norms, five sliding layers (RoPE base 10k) to a global one (1M, scaled)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=GEMMA_VOCAB, num_hidden_layers=7, query_pre_attn_scalar=32, sliding_window=WINDOW,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
        bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0, **EAGER, **SHAPE))


def qwen2() -> Any:  # q/k/v biases, untied head; llama.cpp's qwen2 takes head_dim = hidden / heads only
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=QWEN_VOCAB, num_hidden_layers=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=None,
        eos_token_id=[260, 258], **(SHAPE | dict(head_dim=16))))


def qwen3() -> Any:  # q/k norms, tied head
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=QWEN_VOCAB, num_hidden_layers=2, tie_word_embeddings=True,
                                        bos_token_id=None, eos_token_id=[260, 258], **SHAPE))


FAMILIES: dict[str, Callable[[], Any]] = {"gemma": gemma, "gemma2": gemma2, "gemma3": gemma3, "qwen2": qwen2,
                                          "qwen3": qwen3}


def _random(model: Any) -> Any:
    model.eval()
    with torch.no_grad():  # random norms and biases, so that each one (and the +1 of Gemma's) matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def gemma_sp() -> Any:
    return train_gemma_sentencepiece()


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               gemma_sp: Any) -> tuple[str, Any, Path]:
    """(family, transformers model, its directory with a tokenizer of the family's kind)."""
    name = request.param
    torch.manual_seed(list(FAMILIES).index(name) + 11)
    model = _random(FAMILIES[name]())
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root)
    if name.startswith("gemma"):
        write_gemma_tokenizer(root, gemma_sp)
    else:
        write_qwen2_tokenizer(root)
    return name, model, root


def _float_file(root: Path, out: Path) -> Path:
    """The directory as a GGUF file of F32 tensors: our writer with every tensor planned float."""
    config, lazy = hf_tensors(root)
    write_gguf(out, config, root, [PlannedTensor(n, t.shape, None, partial(t.load)) for n, t in lazy.items()])
    return out


@pytest.fixture(scope="module")
def float_file(checkpoint: tuple[str, Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _float_file(checkpoint[2], tmp_path_factory.mktemp("f32") / "model.gguf")


def _hf_state(model: Any) -> dict[str, torch.Tensor]:
    """transformers' state dict less a tied head (the embedding again)."""
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _norm_atol(name: str, family: str) -> float:
    # Gemma's norms go through the file as 1 + w in float32: w comes back within an ulp of 1.
    return 2.5e-7 if family.startswith("gemma") and name.endswith("norm.weight") else 0.0


def test_float_file_reads_back_as_the_checkpoint(checkpoint: tuple[str, Any, Path], float_file: Path) -> None:
    family, model, _ = checkpoint
    config, state, tokenizer = load_gguf(float_file, torch.float32)
    hf = ModelConfig.from_hf(model.config.to_dict())
    # The file holds float32 metadata: eps comes back as the float32 nearest to config.json's.
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-7)
    assert config == replace(hf, bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids,
                             rms_norm_eps=config.rms_norm_eps)
    assert config.eos_token_ids[:2] == hf.eos_token_ids and tokenizer.bos_token_id == hf.bos_token_id
    expected = _hf_state(model)
    assert set(state) == set(expected)
    for name, weight in expected.items():
        read = state[name]
        assert isinstance(read, torch.Tensor) and read.dtype == torch.float32, name
        torch.testing.assert_close(read, weight, rtol=0, atol=_norm_atol(name, family), msg=name)


def test_tensors_stored_as_llama_cpps_converter_stores_them(checkpoint: tuple[str, Any, Path],
                                                            float_file: Path) -> None:
    """Names as gguf-py's map (llama.cpp's converter's) gives them, Gemma's norms as 1 + w, q/k rows as HF
    has them (NEOX RoPE), no output tensor for a tied head."""
    family, model, _ = checkpoint
    reader = gguf.GGUFReader(float_file)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == family
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], model.config.num_hidden_layers)
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    expected = {str(names.get_name(k, try_suffixes=(".weight", ".bias"))): v.numpy()
                for k, v in _hf_state(model).items()}
    assert set(stored) == set(expected)
    shift = 1.0 if family.startswith("gemma") else 0.0
    for name, weight in expected.items():
        want = weight + np.float32(shift) if name.endswith("norm.weight") else weight
        assert np.array_equal(stored[name].reshape(want.shape), want), name


def test_quantized_file_is_the_quantized_checkpoint(checkpoint: tuple[str, Any, Path],
                                                     tmp_path: Path) -> None:
    """`loraserve quantize DIR OUT --type q8_0`, read back as stored: the blocks quantizing the directory at
    load gives, the norms and biases as they are."""
    family, _, root = checkpoint
    out = tmp_path / "q8.gguf"
    convert(str(root), out, Quantization.Q8_0)
    _, from_dir = load_hf_quantized(root, torch.float32, Quantization.Q8_0)
    config, from_file, _ = load_gguf(out, torch.float32, keep_quantized=True)
    assert config == load_gguf(_float_file(root, tmp_path / "f32.gguf"), torch.float32)[0]
    assert_same_weights(from_file, from_dir, partial(_norm_atol, family=family))


def test_float_file_served_as_transformers_runs_the_model(checkpoint: tuple[str, Any, Path],
                                                          float_file: Path) -> None:
    _, model, _ = checkpoint
    engine, _ = load_engine(str(float_file), EngineConfig(dtype="float32", threads=1, block_size=4))
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(engine, PROMPT), hf_logits(model, PROMPT), rtol=0, atol=2e-4)


@pytest.mark.skipif(load_qlinear() is None, reason="no C compiler: no quantized kernel")
def test_quantized_file_served_as_stored_is_quantize_at_load(checkpoint: tuple[str, Any, Path],
                                                              tmp_path: Path) -> None:
    """--dtype gguf on the written file is --quantize q4_0 on the directory, bit for bit."""
    _, _, root = checkpoint
    convert(str(root), tmp_path / "q4.gguf", Quantization.Q4_0)
    options: dict[str, Any] = dict(dtype="gguf", threads=1, block_size=4)
    from_file, _ = load_engine(str(tmp_path / "q4.gguf"), EngineConfig(**options))
    at_load, _ = load_engine(str(root), EngineConfig(quantize=Quantization.Q4_0, **options))
    assert torch.equal(prompt_logits(from_file, PROMPT), prompt_logits(at_load, PROMPT))


def test_tokenizer_round_trip(checkpoint: tuple[str, Any, Path], float_file: Path, gemma_sp: Any) -> None:
    family, _, root = checkpoint
    reader = gguf.GGUFReader(float_file)
    ours, theirs = Tokenizer.from_gguf(reader), Tokenizer.from_hf_dir(root)
    kind = bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode()
    for text in [*TEXTS, f"{GEMMA_SPECIALS[0]}hi{GEMMA_SPECIALS[1]}", "<|im_start|>hi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text, add_bos=False), skip_special_tokens=False) == text, text
    assert (ours.bos_token_id, ours.add_bos) == (theirs.bos_token_id, theirs.add_bos)
    assert ours.eos_token_ids == theirs.eos_token_ids
    assert ours.chat_template.source == theirs.chat_template.source is not None
    if family.startswith("gemma"):  # sentencepiece itself is the oracle
        assert kind == "llama"
        assert all(ours.encode(t, add_bos=False) == gemma_sp.encode(t) for t in TEXTS)
    else:
        assert kind == "gpt2"
        assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"


def test_configs_llama_cpp_cannot_hold_are_refused(checkpoint: tuple[str, Any, Path], tmp_path: Path) -> None:
    """What llama.cpp derives instead of reading (the sliding pattern, the query scale, Gemma 2's caps) must
    be the model's: otherwise no file is written."""
    family, _, root = checkpoint
    config, lazy = hf_tensors(root)
    plan = [PlannedTensor(n, t.shape, None, partial(t.load)) for n, t in lazy.items()]
    out = tmp_path / "x.gguf"
    changes: list[tuple[dict[str, Any], str]] = [
        (dict(query_pre_attn_scalar=20.0), "query_pre_attn_scalar"),
        (dict(sliding_window=WINDOW, sliding_layers=(False, True) * (config.num_layers // 2)
              + (True,) * (config.num_layers % 2)), "sliding_layers"),
    ]
    if family == "gemma2":
        changes.append((dict(attn_logit_softcapping=None), "attn_logit_softcapping"))
    if family in ("gemma3", "qwen3", "gemma"):
        changes.append((dict(attn_logit_softcapping=4.0), "attn_logit_softcapping"))
    for change, field in changes:
        with pytest.raises(ValueError, match=rf"llama\.cpp's {family} architecture cannot hold .* {field} "):
            write_gguf(out, replace(config, **change), root, plan)
        assert list(tmp_path.iterdir()) == []  # nor a .partial
    if family == "qwen2":  # its q/k/v are hidden_size rows in llama.cpp, whatever key_length says
        with pytest.raises(ValueError, match=r"qwen2 architecture cannot hold this model: it sizes q/k/v"):
            write_gguf(out, replace(config, head_dim=32), root, plan)


def test_a_tokenizer_llama_cpp_has_no_kind_for_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qwen3().save_pretrained(tmp_path / "hf")
    unigram = HFTokenizer(Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    unigram.save(str(tmp_path / "hf" / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"a Unigram tokenizer cannot be written to GGUF yet \(BPE only\)"):
        convert(str(tmp_path / "hf"), tmp_path / "x.gguf", Quantization.Q8_0)
    assert not list(tmp_path.glob("x.gguf*"))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_reads_the_file_as_transformers_runs_the_model(checkpoint: tuple[str, Any, Path],
                                                                 float_file: Path) -> None:
    """llama.cpp loads the file, tokenizes as we do, and its logits for a prompt past the sliding window
    are transformers' within its float16 KV cache's rounding: a norm without its + 1, rows in the wrong
    RoPE order, a wrong sliding layer or query scale would be far off."""
    import llama_cpp

    _, model, _ = checkpoint
    ours = Tokenizer.from_gguf(gguf.GGUFReader(float_file))
    llm = llama_cpp.Llama(model_path=str(float_file), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        tokens = {text: llm.tokenize(text.encode(), add_bos=False, special=True) for text in TEXTS}
        llm.eval(PROMPT)
        theirs = torch.from_numpy(np.array(llm.scores[:len(PROMPT)], dtype=np.float32))
    finally:
        llm.close()
    assert tokens == {text: ours.encode(text, add_bos=False) for text in TEXTS}
    with torch.no_grad():
        reference = hf_logits(model, PROMPT)
    rel = (theirs - reference).norm(dim=1) / reference.norm(dim=1)
    assert rel.max() < 0.01, rel
    assert (theirs.argmax(1) == reference.argmax(1)).float().mean() > 0.9

"""Gemma's and Qwen2's tokenizer files as transformers writes them (its own GemmaTokenizer / Qwen2Tokenizer
pipelines over a small vocabulary), read by `Tokenizer.from_hf_dir` as transformers reads them; and a
multimodal Gemma 3 directory, weights and tokenizer, served through `load_engine`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaTokenizer,
    Qwen2Tokenizer,
)

from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_engine
from loraserve.engine.weights.tokenizer import Tokenizer
from loraserve.types import ChatMessage, SamplingParams

from engine_helpers import hf_greedy
from gguf_helpers import bytes_to_unicode
from hf_family_helpers import GEMMA3_TEXT, SIGLIP

GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["hello world", " hello  world ", "héllo\nworld 42", "<start_of_turn>user\nhi<end_of_turn>",
         "<|im_start|>user\nhello<|im_end|>", "😀", ""]
_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "or", "ld", "▁h",
           "▁hello"]
_MERGES = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("▁", "w"), ("o", "r"), ("l", "d"), ("▁", "h"),
           ("▁", "hello")]


def write_gemma_tokenizer(root: Path) -> Any:
    """Gemma's kind: sentencepiece-style BPE with byte fallback, <bos> added, turn markers as specials."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}
    for piece in _PIECES:
        vocab.setdefault(piece, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=_MERGES, add_bos_token=True, chat_template=GEMMA_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.save_pretrained(root)
    return tokenizer


def write_qwen2_tokenizer(root: Path) -> Any:
    """Qwen2's kind: byte-level BPE, no BOS, ChatML turn markers, <|im_end|> the EOS of an instruct model."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())} | {"he": 256, "ll": 257, "llo": 258}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("ll", "o")],
                               eos_token="<|im_end|>", chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(root)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [
        tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]}))
    return tokenizer


def _assert_reads_as_transformers(ours: Tokenizer, root: Path) -> Any:
    theirs = AutoTokenizer.from_pretrained(root)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text  # BOS added (or not) as transformers adds it
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    messages = [ChatMessage("user", "hello")]
    assert ours.chat_template.render(messages) == theirs.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    return theirs


def test_gemma_tokenizer(tmp_path: Path) -> None:
    write_gemma_tokenizer(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    theirs = _assert_reads_as_transformers(ours, tmp_path)
    assert ours.add_bos and ours.bos_token_id == theirs.bos_token_id == 2
    # A chat answer ends with <end_of_turn>: it stops generation beside <eos>.
    assert set(ours.eos_token_ids) == {1, theirs.convert_tokens_to_ids("<end_of_turn>")}
    prompt = ours.chat_template.render([ChatMessage("user", "hi")])
    assert ours.encode(prompt).count(2) == 1  # the template's <bos>, not a second one


def test_qwen2_tokenizer(tmp_path: Path) -> None:
    write_qwen2_tokenizer(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    theirs = _assert_reads_as_transformers(ours, tmp_path)
    assert not ours.add_bos and ours.bos_token_id is None and theirs.bos_token_id is None
    ends = ("<|im_end|>", "<|endoftext|>")
    assert set(ours.eos_token_ids) == {theirs.convert_tokens_to_ids(t) for t in ends}


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A multimodal Gemma 3 checkpoint with Gemma's tokenizer, as a Hub directory has them."""
    root = tmp_path_factory.mktemp("gemma3")
    write_gemma_tokenizer(root)
    torch.manual_seed(5)
    text = {**GEMMA3_TEXT, "vocab_size": 288, "bos_token_id": 2, "eos_token_id": 1}
    model: Any = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=Gemma3TextConfig(**text), vision_config=SIGLIP, mm_tokens_per_image=4,
        image_token_index=285, boi_token_index=286, eoi_token_index=287, attn_implementation="eager")).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(root)
    return model, root


def test_a_multimodal_gemma3_directory_is_served_as_its_text_model(gemma3_dir: tuple[Any, Path]) -> None:
    model, root = gemma3_dir
    engine, tokenizer = load_engine(str(root), EngineConfig(threads=1, block_size=4))
    assert engine.cfg.architecture == "gemma3_text" and engine.model.family.model_type == "gemma3_text"
    assert {1, tokenizer.token_to_id("<end_of_turn>")} <= engine.eos_ids
    prompt = tokenizer.encode(tokenizer.chat_template.render([ChatMessage("user", "hello world")]))
    assert prompt[:2] == [2, tokenizer.token_to_id("<start_of_turn>")]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out == hf_greedy(model, prompt, 12)

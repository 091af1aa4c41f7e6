"""Tiny Hugging Face directories (a transformers Llama saved with save_pretrained, plus a tokenizer) for the
quantizer, the GGUF writer and `loraserve quantize`; and the logits of a prompt on our engine."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import generate_merges  # type: ignore[attr-defined]

from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.weights.quant import QuantTensor
from loraserve.types import SamplingParams

from engine_helpers import run_traced
from gguf_helpers import bytes_to_unicode

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
BYTE_LEVEL_VOCAB = 260  # 256 bytes, "he", "ll", then <|im_start|> and <|im_end|>
PRE_TOKENIZERS = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
    # SmolLM2's own tokenizer.json: digits one by one, then GPT-2's regex
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}


def tiny_hf_dir(root: Path, vocab_size: int = BYTE_LEVEL_VOCAB, tie: bool = False, seed: int = 3,
                dtype: torch.dtype = torch.bfloat16) -> Path:
    """A 2-layer Llama (GQA, rows of 256 and 512) saved in `dtype` as a checkpoint on disk is, weights
    spread so that logits have no near ties; no tokenizer (see the writers below)."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(root)
    return root


def write_byte_level_tokenizer(root: Path, pre: str = "gpt-2") -> None:
    """A byte-level BPE tokenizer.json (SmolLM2's kind) of BYTE_LEVEL_VOCAB tokens, with a chat template."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())} | {"he": 256, "ll": 257}
    backend = HFTokenizer(BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")]))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                                AddedToken("<|im_end|>", special=True, normalized=False)])
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": CHAT_TEMPLATE}))


def train_sentencepiece(vocab_size: int = 400) -> spm.SentencePieceProcessor:
    """A small BPE model with Llama 2's settings: byte fallback, split digits, no normalization."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "token",
             "model", "你好", "世界", "café", "naïve"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(["", ".", " 123"])
             for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        character_coverage=0.99, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def write_sentencepiece_tokenizer(root: Path, sp: spm.SentencePieceProcessor) -> None:
    """Llama 2's tokenizer.json layout for `sp`, as transformers' LlamaConverter builds it (merges from
    the pieces, ranked by id; a "▁" prepended and spaces replaced; BOS added)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    backend = HFTokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>",
                              fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>")])
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))


def assert_same_weights(read: Mapping[str, Any], expected: Mapping[str, Any],
                        atol: Callable[[str], float] = lambda name: 0.0) -> None:
    """A GGUF file's state dict against quantize-at-load's: the same names, blocks byte for byte, float
    tensors within `atol(name)` (0: equal)."""
    assert set(read) == set(expected)
    for name, weight in expected.items():
        got = read[name]
        if isinstance(weight, QuantTensor):
            assert isinstance(got, QuantTensor) and got.qtype is weight.qtype, name
            assert torch.equal(got.blocks, weight.blocks), name
        else:
            assert isinstance(got, torch.Tensor) and isinstance(weight, torch.Tensor), name
            torch.testing.assert_close(got, weight, rtol=0, atol=atol(name), msg=name)


def prompt_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), V]: the logits at every prompt position, computed by the real engine."""
    seq = engine.add_request(f"p{len(prompt)}", prompt, SamplingParams(max_tokens=1, temperature=0))
    rows = sorted(run_traced(engine).rows[seq.seq_id], key=lambda row: row[0])
    return torch.stack([logits for _, logits in rows])

"""A model's tokenizer as GGUF `tokenizer.*` metadata, the way llama.cpp's converter stores it.

From a Hugging Face `tokenizer.json`: byte-level BPE (SmolLM2, Llama 3, Qwen2/3) becomes model "gpt2" with
its merges and llama.cpp's name for the pre-tokenizer; a sentencepiece BPE with byte fallback (Llama 2,
Mistral, Gemma, whose pieces take no dummy prefix) becomes model "llama" with pieces, scores and token
types. Other kinds (Unigram, WordPiece) are refused. From a GGUF file (the embedded
SmolLM2, whose tokenizer random models use) the metadata is copied as it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from loraserve.engine.weights.gguf_meta import gguf_field
from loraserve.engine.weights.tokenizer import GGUFTokenType, Tokenizer, gpt2_pre_tokenizer

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp's pre-tokenizer names this engine reads back (tokenizer.py), tried in turn on a probe text the
# way llama.cpp's converter recognizes a tokenizer: the first that splits it as tokenizer.json does wins.
_PRE_TOKENIZERS = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_PROBE = ("\n \n\n \t\t \t\n  \n   \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 3 33 333 3333 33333 3.3 3..3 "
          "我想在apple工作1314151天～ ------======= нещо на Български "
          "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
          "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")


def add_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """`source` is a Hugging Face directory or a GGUF file; `vocab_size` is the model's (the embedding's
    rows), which llama.cpp requires the token list to match."""
    if source.is_file():
        _copy_gguf_tokenizer(writer, gguf.GGUFReader(source))
        return
    path = source / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{source} has no tokenizer.json to write the GGUF vocabulary from")
    spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{path}: a {spec.get('model', {}).get('type')} tokenizer cannot be written to GGUF "
                         "yet (BPE only)")
    backend = HFTokenizer.from_file(str(path))
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{path}: token id {max(vocab.values())} is past the model's {vocab_size} rows")
    # Ids the tokenizer leaves out (an embedding padded to a round size) get placeholders, as llama.cpp's do.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [GGUFTokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, GGUFTokenType.NORMAL
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = GGUFTokenType.CONTROL if added.special else GGUFTokenType.USER_DEFINED
    sentencepiece = bool(spec["model"].get("byte_fallback"))
    if sentencepiece:
        _add_sentencepiece(writer, spec, tokens, types)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(backend, path))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    special = gguf.SpecialVocab(source, load_merges=not sentencepiece, n_vocab=vocab_size)
    # Whether BOS is added as our loader decides it for this directory, so the file encodes alike.
    special.add_special_token["bos"] = Tokenizer.from_hf_dir(source).add_bos
    special.add_to_gguf(writer, quiet=True)


def _add_sentencepiece(writer: gguf.GGUFWriter, spec: dict[str, Any], tokens: list[str],
                       types: list[GGUFTokenType]) -> None:
    """llama.cpp's "llama" tokenizer merges the adjacent pair whose result scores best; tokenizer.json
    ranks merges instead, so a piece scores minus the rank of the first merge that makes it."""
    model = spec["model"]
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    for i, token in enumerate(tokens):
        if types[i] == GGUFTokenType.NORMAL and _BYTE_TOKEN.fullmatch(token):
            types[i] = GGUFTokenType.BYTE
    unk = model.get("unk_token")
    if unk in tokens:
        types[tokens.index(unk)] = GGUFTokenType.UNKNOWN
    # A piece no merge makes is never made from text; it scores below every merge.
    scores = [-float(rank.get(t, len(merges))) if types[i] == GGUFTokenType.NORMAL else 0.0
              for i, t in enumerate(tokens)]
    writer.add_tokenizer_model("llama")
    writer.add_token_scores(scores)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """sentencepiece's dummy prefix: a Prepend("▁") normalizer, or a Metaspace step that prepends."""
    steps: list[dict[str, Any]] = []
    for key in ("normalizer", "pre_tokenizer"):
        part = spec.get(key) or {}
        steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    return any(s.get("type") == "Prepend" or (s.get("type") == "Metaspace"
                                               and s.get("prepend_scheme", "always") != "never")
               for s in steps)


def _pre_tokenizer_name(backend: HFTokenizer, path: Path) -> str:
    if backend.pre_tokenizer is None:
        raise ValueError(f"{path}: a byte-level BPE without a pre-tokenizer is not supported")
    expected = backend.pre_tokenizer.pre_tokenize_str(_PROBE)
    for name in _PRE_TOKENIZERS:
        pre_tokenizer, _ = gpt2_pre_tokenizer(name)
        if pre_tokenizer.pre_tokenize_str(_PROBE) == expected:
            return name
    raise ValueError(f"{path}: its pre-tokenizer matches none of llama.cpp's known here "
                     f"({', '.join(_PRE_TOKENIZERS)})")


def _copy_gguf_tokenizer(writer: gguf.GGUFWriter, reader: gguf.GGUFReader) -> None:
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = gguf_field(reader, key)
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            items = value.tolist() if isinstance(value, np.ndarray) else list(value)
            writer.add_key_value(key, items, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)

"""The model's tokenizer, built from a Hugging Face directory or from a GGUF file's metadata.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges (or scores) and token
types as metadata, and names the pre-tokenizer. We rebuild the equivalent `tokenizers` pipeline, so
text encodes to the same ids llama.cpp and the model's own tokenizer.json give.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from loraserve.chat_template import ChatTemplate
from loraserve.engine.weights.gguf_meta import gguf_field

# Special tokens that end an assistant turn in common chat templates; generation stops on them too,
# because a chat model ends its answer with the turn marker, which is often not the file's EOS.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class GGUFTokenType(enum.IntEnum):
    """llama.cpp's `tokenizer.ggml.token_type` values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class GGUFTokenizerModel(enum.Enum):
    GPT2 = "gpt2"  # byte-level BPE with explicit merges (SmolLM2, Llama 3, Qwen, ...)
    LLAMA = "llama"  # sentencepiece BPE: scores instead of merges, byte fallback (Llama 2, Mistral)


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(split: str | None) -> pre_tokenizers.PreTokenizer:
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def gpt2_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for llama.cpp's `tokenizer.ggml.pre` name, as llama-vocab.cpp
    maps it."""
    if pre in ("default", "gpt-2", "gpt2", "starcoder", "refact", "olmo"):
        return _byte_level(None), False
    if pre == "smollm":
        # Digits one by one, then GPT-2's regex: what SmolLM2's tokenizer.json says.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        return _byte_level(_LLAMA3_SPLIT), True
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _byte_level(_QWEN2_SPLIT), False
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


def _sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float],
                          types: Sequence[int]) -> list[tuple[str, str]]:
    """Merges equivalent to sentencepiece's BPE, which joins the adjacent pair whose result scores best.

    Only normal and user-defined pieces are merge results: control and byte tokens must never be
    produced from text.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, int, str, str]] = []
    for token, score, kind in zip(tokens, scores, types, strict=True):
        if kind not in (GGUFTokenType.NORMAL, GGUFTokenType.USER_DEFINED) or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-float(score), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for _, _, _, left, right in merges]


class Tokenizer:
    """Text <-> token ids for one model, with what the engine needs to know about its special tokens."""

    def __init__(
        self,
        backend: HFTokenizer,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: ChatTemplate,
    ) -> None:
        if add_bos and bos_token_id is None:
            raise ValueError("add_bos needs a BOS token")
        self._tok = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))  # ordered, no duplicates
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        # sentencepiece's byte-fallback tokens `<0xE4>`: the decoder turns a run of them into text as a
        # whole, so a streaming decoder must not cut such a run.
        self.byte_token_ids = frozenset(
            i for t, i in backend.get_vocab(with_added_tokens=False).items() if _BYTE_TOKEN.fullmatch(t)
        ) if getattr(backend.model, "byte_fallback", False) else frozenset()

    # --- loading -----------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From `tokenizer.json` + `tokenizer_config.json` (and `generation_config.json` for extra EOS
        ids)."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise ValueError(f"{root} has no tokenizer.json "
                             "(a sentencepiece-only tokenizer.model is not supported)")
        backend = HFTokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        bos = _token_content(config.get("bos_token"))
        eos = _token_content(config.get("eos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        eos_ids = [i for i in (backend.token_to_id(eos) if eos else None,) if i is not None]
        for extra in (_read_json(root / "generation_config.json"), _read_json(root / "config.json")):
            value = extra.get("eos_token_id")
            eos_ids += value if isinstance(value, list) else ([value] if isinstance(value, int) else [])
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"]) and bos_id is not None
        else:
            # No flag: whatever the file's post-processor does is what the model was trained with.
            add_bos = bos_id is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        # The post-processor would add BOS on its own; we add it ourselves, once.
        backend.post_processor = None
        source = _hf_chat_template(root, config)
        return cls._finish(backend, bos_id, eos_ids, add_bos, source, bos or "", eos or "")

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """From the `tokenizer.*` metadata llama.cpp's converter writes."""
        model_name = gguf_field(reader, "tokenizer.ggml.model")
        try:
            model = GGUFTokenizerModel(model_name)
        except ValueError:
            raise ValueError(f"unsupported GGUF tokenizer model {model_name!r}") from None
        tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
        types = [int(t) for t in gguf_field(reader, "tokenizer.ggml.token_type",
                                            [GGUFTokenType.NORMAL] * len(tokens))]
        if model is GGUFTokenizerModel.GPT2:
            backend = _gpt2_backend(reader, tokens)
        else:
            backend = _sentencepiece_backend(reader, tokens, types)
        _register_added_tokens(backend, tokens, types)

        bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id")
        eos_ids = [gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
        add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", model is GGUFTokenizerModel.LLAMA))
        return cls._finish(
            backend, bos_id, [i for i in eos_ids if i is not None], add_bos and bos_id is not None,
            gguf_field(reader, "tokenizer.chat_template"),
            tokens[bos_id] if bos_id is not None else "",
            tokens[eos_ids[0]] if eos_ids[0] is not None else "",
        )

    @classmethod
    def _finish(
        cls, backend: HFTokenizer, bos_id: int | None, eos_ids: list[int], add_bos: bool,
        template_source: str | None, bos: str, eos: str,
    ) -> Tokenizer:
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        eos_ids += [specials[name] for name in _END_OF_TURN_TOKENS if name in specials]
        # Models without a template of their own are Llama-2 style: the public service's default.
        template = (ChatTemplate.from_jinja(template_source, bos, eos) if template_source
                    else ChatTemplate.llama2())
        return cls(backend, bos_id, eos_ids, add_bos, template)

    # --- use -----------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids; special tokens written in the text (`<|im_start|>`, `<s>`) become their ids.

        BOS is added when asked (default: when the model adds one), but not twice: a chat template
        that writes `<s>` itself already gave the prompt its BOS.
        """
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self._tok.id_to_token(token_id)
        return token

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self._tok.token_to_id(token)
        return token_id

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids}, "
                f"add_bos={self.add_bos}, {self.chat_template!r})")


def _gpt2_backend(reader: gguf.GGUFReader, tokens: list[str]) -> HFTokenizer:
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges", [])]
    pre_tokenizer, ignore_merges = gpt2_pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "default"))
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a few files repeat a placeholder token; the first id wins
    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(reader: gguf.GGUFReader, tokens: list[str], types: list[int]) -> HFTokenizer:
    scores = [float(s) for s in gguf_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk_id = gguf_field(reader, "tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(BPE(
        vocab=vocab, merges=_sentencepiece_merges(tokens, scores, types),
        unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True, byte_fallback=True,
    ))
    # sentencepiece's "dummy prefix": every run of text (also right after a special token) gets a
    # leading space, the way llama.cpp and Llama 2's tokenizer.json both do it.
    prefix = bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True))
    steps: list[normalizers.Normalizer] = [normalizers.Prepend("▁")] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    chain: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        chain.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(chain)
    return backend


def _register_added_tokens(backend: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control (and unknown) tokens become special: parsed whole, skipped on decode. User-defined ones are
    parsed whole too, and decoded. That is the set llama.cpp matches in text before tokenizing the rest."""
    kinds = (GGUFTokenType.CONTROL, GGUFTokenType.UNKNOWN)
    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types, strict=True) if k in kinds and t]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True) if k == GGUFTokenType.USER_DEFINED and t]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a special token either as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _hf_chat_template(root: Path, config: dict[str, Any]) -> str | None:
    jinja_file = root / "chat_template.jinja"  # transformers >= 4.49 saves the template beside the config
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

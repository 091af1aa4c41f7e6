"""GGUF files written here the way llama.cpp's converter writes them, from a tiny transformers Llama."""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import sentencepiece as spm
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import generate_merges  # type: ignore[attr-defined]

Q = gguf.GGMLQuantizationType


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
    """Random K-quant data with sane float16 scales: every bit pattern of the quants and the per-piece
    scales (Q6_K's negative ones too)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (block_bytes - 2,)}[kind]
    for offset in scale_offsets:
        blocks[..., offset:offset + 2] = (
            rng.uniform(0.001, 0.01, size=blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8))
    return blocks.reshape(rows, -1)


def quantize_k(w: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """w [rows, cols] as Q4_K, Q5_K or Q6_K blocks [rows, cols / 256 * bytes] (gguf-py cannot quantize
    these): a plain reference quantizer, min/max per piece (not ggml's search), packed as ggml packs."""
    rows = w.shape[0]
    if kind == Q.Q6_K:
        return _quantize_q6_k(w.reshape(-1, 16, 16).astype(np.float32)).reshape(rows, -1)
    x = w.reshape(-1, 8, 32).astype(np.float32)  # super-blocks, pieces of 32
    nmax = 15 if kind == Q.Q4_K else 31
    low = np.minimum(x.min(-1), 0)
    scale, mins = (x.max(-1) - low) / nmax, -low  # w = scale q - min per piece
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    sc = _ratio(scale, d[:, None]).clip(0, 63).astype(np.uint8)
    m = _ratio(mins, dmin[:, None]).clip(0, 63).astype(np.uint8)
    step = d[:, None].astype(np.float32) * sc
    q = _ratio(x + (dmin[:, None].astype(np.float32) * m)[..., None], step[..., None]).clip(0, nmax)
    q = q.astype(np.uint8)  # [S, 8, 32]
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)
    nibbles = (q[:, 0::2] & 15) | (q[:, 1::2] & 15) << 4  # piece 2c low, 2c + 1 high: [S, 4, 32]
    parts = [d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales]
    if kind == Q.Q5_K:  # bit j of qh[i]: bit 4 of piece j's element i
        parts.append(((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8))
    parts.append(nibbles.reshape(-1, 128))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """round(a / b), 0 where b is 0."""
    safe = np.where(b == 0, 1, b)
    return np.where(b == 0, 0, np.round(a / safe))


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x [S, 16, 16] (super-blocks, 16 per scale) -> Q6_K blocks [S, 210]. The value of largest
    magnitude maps to -32, as in ggml, so scales come in both signs."""
    big = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    scale = big / -32
    d = (np.abs(scale).max(-1) / 127).astype(np.float16)
    sc = _ratio(scale, d[:, None]).clip(-128, 127).astype(np.int8)
    step = d[:, None].astype(np.float32) * sc
    q = (_ratio(x, step[..., None]).clip(-32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [S, h, u, i]
    ql = (q[:, :, 0:2] & 15) | (q[:, :, 2:4] & 15) << 4  # ql[64 h + 32 c + i]: pieces u = c (low), c + 2
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(2, dtype=np.uint8)  # [S, h, i]
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                           d[:, None].view(np.uint8)], axis=1)


def k_quant_pieces(blocks: np.ndarray, kind: gguf.GGMLQuantizationType,
                   rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K-quant blocks read as the kernel reads them (csrc/qlinear_k.h), in pieces of 32: d [rows, P],
    c [rows, P] and q [rows, P, 32] int64 with w = d * q + c, q holding the integer scales (sc q, or
    Q6_K's sc (q - 32)) and c the offset (-dmin m; 0 for Q6_K)."""
    b = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[kind][1])
    q = np.zeros((b.shape[0], 8, 32), dtype=np.int64)
    c = np.zeros((b.shape[0], 8), dtype=np.float32)
    if kind == Q.Q6_K:
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
        sc = b[:, 192:208].view(np.int8).astype(np.int64)
        for j in range(8):
            h, u = divmod(j, 4)
            ql = b[:, 64 * h + 32 * (u % 2):][:, :32].astype(np.int64) >> 4 * (u // 2) & 15
            qh = b[:, 128 + 32 * h:][:, :32].astype(np.int64) >> 2 * u & 3
            q[:, j] = ((ql | qh << 4) - 32) * np.repeat(sc[:, 2 * j:2 * j + 2], 16, axis=1)
    else:
        d, dmin = (b[:, o:o + 2].copy().view(np.float16).astype(np.float32)[:, 0] for o in (0, 2))
        s = b[:, 4:16].astype(np.int64)
        sc = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 15) | (s[:, :4] >> 6) << 4], axis=1)
        m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | (s[:, 4:8] >> 6) << 4], axis=1)
        start = 48 if kind == Q.Q5_K else 16
        for j in range(8):
            qj = b[:, start + 32 * (j // 2):][:, :32].astype(np.int64) >> 4 * (j % 2) & 15
            if kind == Q.Q5_K:
                qj |= (b[:, 16:48].astype(np.int64) >> j & 1) << 4
            q[:, j] = qj * sc[:, j:j + 1]
        c = (-dmin[:, None] * m).astype(np.float32)
    pieces = b.shape[0] // rows * 8
    return (np.repeat(d, 8).reshape(rows, pieces), c.reshape(rows, pieces), q.reshape(rows, pieces, 32))


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


def write_gguf(model: LlamaForCausalLM, path: Path, extra: dict[str, np.ndarray] | None = None,
               projection_types: list[Any] | None = None, embedding_type: Any = None) -> dict[str, Any]:
    """A llama.cpp-style GGUF of `model`; returns {gguf tensor name: type} for the checks. Projections
    take `projection_types` in order, cycling (default LAYER_TYPES: every supported type); the embedding
    `embedding_type` (default Q8_0), an untied head Q6_K."""
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
    types: dict[str, Any] = {}
    projections = itertools.cycle(projection_types or LAYER_TYPES)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name)
        w = tensor.numpy()
        if name.startswith(("blk.0.attn_q", "blk.1.attn_q")):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".attn_k." in name:
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        fixed = {"token_embd.weight": embedding_type or Q.Q8_0, "output.weight": Q.Q6_K}
        kind = Q.F32 if w.ndim == 1 else fixed[name] if name in fixed else next(projections)
        if kind == Q.F32:
            writer.add_tensor(name, w.astype(np.float32))
        elif kind == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        elif kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            writer.add_tensor(name, quantize_k(w, kind), raw_dtype=kind)
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


# --- tokenizers of the Qwen and Gemma kinds, for the families' GGUF tests ----------------------------

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")


def write_qwen2_tokenizer(root: Path) -> None:
    """Qwen2's tokenizer.json layout (byte-level BPE behind its own split regex, digits one by one, no BOS)
    over the 256 bytes and two merges (ids 256, 257), its special tokens 258 to 260."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())} | {"he": 256, "ll": 257}
    backend = HFTokenizer(BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIALS])
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
         "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}))


def train_gemma_sentencepiece() -> spm.SentencePieceProcessor:
    """A small BPE model with Gemma's settings: <pad> <eos> <bos> <unk> first, no dummy prefix, byte
    fallback, split digits, whitespace-only pieces, its turn markers as user-defined pieces."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "token",
             "model", "你好", "世界", "café", "naïve", "\n", "  "]
    lines = ["".join(rng.choice(words) + rng.choice(" \n ") for _ in range(rng.randint(3, 12)))
             for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=list(GEMMA_SPECIALS), character_coverage=0.99, minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>",
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def write_gemma_tokenizer(root: Path, sp: spm.SentencePieceProcessor) -> None:
    """Gemma's tokenizer.json layout for `sp`, as transformers' GemmaConverter builds it: spaces replaced by
    "▁" and nothing prepended, merges from the pieces, the turn markers special, BOS added."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    backend = HFTokenizer(BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>",
                              fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<pad>", "<eos>", "<bos>", "<unk>", *GEMMA_SPECIALS)])
    backend.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
         "add_bos_token": True,
         "chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}"
                          "<end_of_turn>\n{% endfor %}"}))

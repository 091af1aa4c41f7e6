"""GGUF files written here the way llama.cpp's converter writes them, from a tiny transformers Llama."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
    """Random K-quant data (gguf-py cannot quantize these) with sane float16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q6_K: (block_bytes - 2,)}[kind]
    for offset in scale_offsets:
        blocks[..., offset:offset + 2] = (
            rng.uniform(0.001, 0.01, size=blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8))
    return blocks.reshape(rows, -1)


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
    rng = np.random.default_rng(0)
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
        elif kind in (Q.Q4_K, Q.Q6_K):
            writer.add_tensor(name, random_k_blocks(kind, w.shape[0], w.shape[1], rng), raw_dtype=kind)
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

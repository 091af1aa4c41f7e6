"""Loading a model: weights and tokenizer from a source, the engine built over them.

`load_backend(source)` is the one entry point the server uses: it loads a model and returns an
`AsyncEngine` (the `loraserve.types.Backend` protocol).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from loraserve import catalog
from loraserve.chat_template import ChatTemplate
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.config import EngineConfig, ModelConfig
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.llm_engine import LLMEngine, resolve_dtype
from loraserve.engine.process import configure_process
from loraserve.engine.sources import EMBEDDED, RANDOM_PREFIX, embedded_gguf_path
from loraserve.engine.weights.gguf_meta import GGUFFile
from loraserve.engine.weights.hf import StateDict, expected_shapes
from loraserve.engine.weights.quant import QuantType, Weight, k_m_type, random_blocks
from loraserve.engine.weights.tokenizer import Tokenizer

RANDOM_SHAPES = catalog.RANDOM_SHAPES


def random_tokenizer() -> Tokenizer:
    """The tokenizer random models use: the embedded SmolLM2's (random models make no text of their own)."""
    return Tokenizer.from_gguf(GGUFFile(str(embedded_gguf_path())))


# A random model's mixes of block types as llama.cpp's Q4_K_M and Q5_K_M files have them, by their base type
# (weights/quant.py k_m_type): its embedding, which is also its head, in the base type as an untied 7B's
# token_embd.
K_MIXES = {"q4_k_m": QuantType.Q4_K, "q5_k_m": QuantType.Q5_K}


def random_model(name: str, tokenizer: Tokenizer, seed: int = 0,
                 max_positions: int = 2048) -> tuple[ModelConfig, StateDict]:
    """`name` is a shape of RANDOM_SHAPES, optionally with a block type (`llama2-7b:q4_0`): projections and
    embedding are then random blocks of that type, as a GGUF file of it would hold them."""
    name, _, quant = name.partition(":")
    if name not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model {name!r}; known: {', '.join(RANDOM_SHAPES)}")
    qtypes = {q.name.lower(): q for q in QuantType}
    if quant and quant not in qtypes and quant not in K_MIXES:
        raise ValueError(f"unknown block type {quant!r} for random:{name}; known: "
                         f"{', '.join([*qtypes, *K_MIXES])}")
    rng = np.random.default_rng(seed)
    shape = {"rope_theta": 10000.0, "tie_word_embeddings": True, **RANDOM_SHAPES[name]}
    if "sliding_layers" in shape:  # a tuple of bools in ModelConfig; JSON-friendly in the catalog
        shape["sliding_layers"] = tuple(shape["sliding_layers"])
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=max_positions,
                      bos_token_id=tokenizer.bos_token_id, eos_token_ids=tokenizer.eos_token_ids, **shape)
    g = torch.Generator().manual_seed(seed)

    def rand(tensor: str, rows: int, cols: int) -> Weight:
        # big enough that outputs vary with the input
        if quant in K_MIXES:
            return random_blocks(rows, cols, k_m_type(tensor, cfg.num_layers, K_MIXES[quant]), 0.02 * 4, rng)
        if quant:
            return random_blocks(rows, cols, qtypes[quant], 0.02 * 4, rng)
        return torch.randn(rows, cols, generator=g) * 0.02 * 4

    # Every tensor the family has: matrices random, norms ones (Gemma's 1 + w: twos) and biases zero.
    state: StateDict = {}
    for tensor, dims in expected_shapes(cfg).items():
        if len(dims) == 2:
            state[tensor] = rand(tensor, *dims)
        else:
            state[tensor] = torch.zeros(dims) if tensor.endswith(".bias") else torch.ones(dims)
    return cfg, state


def load_engine(source: str, config: EngineConfig | None = None) -> tuple[LLMEngine, Tokenizer]:
    """Load weights and tokenizer from `source`: a .gguf file, an HF directory, "embedded" or
    "random:NAME"."""
    ecfg = config or EngineConfig()
    dtype = resolve_dtype(ecfg, torch.device(ecfg.device))
    if source == EMBEDDED:
        source = str(embedded_gguf_path())
    if ecfg.quantize is not None:
        _check_quantize(source)
    if ecfg.dtype == "gguf":
        _check_gguf_dtype(source, ecfg)
    elif ecfg.dtype == "auto" and _keeps_quantized_by_default(source, ecfg):
        ecfg = replace(ecfg, dtype="gguf")
    keep_quantized = ecfg.dtype == "gguf"
    if source.startswith(RANDOM_PREFIX):
        tokenizer = random_tokenizer()
        cfg, state = random_model(source.removeprefix(RANDOM_PREFIX), tokenizer, seed=ecfg.seed)
    elif source.endswith(".gguf") and os.path.isfile(source):
        from loraserve.engine.weights import loader as weights

        cfg, state, tokenizer = weights.load_gguf(source, dtype, keep_quantized)
    elif os.path.isdir(source) and ecfg.quantize is not None:
        from loraserve.engine.weights.quantize import load_hf_quantized

        cfg, state = load_hf_quantized(Path(source), dtype, ecfg.quantize)
        tokenizer = Tokenizer.from_hf_dir(source)
    elif os.path.isdir(source):
        from loraserve.engine.weights import loader as weights

        cfg, state = weights.load_hf_dir(source, dtype)
        tokenizer = Tokenizer.from_hf_dir(source)
    else:
        raise FileNotFoundError(f"model source {source!r} is neither a .gguf file, a model directory, "
                                f"{EMBEDDED!r} nor {RANDOM_PREFIX}NAME")
    configure_process(ecfg)
    engine = LLMEngine(cfg, state, ecfg)
    if keep_quantized and source.endswith(".gguf"):
        from loraserve.engine.weights.gguf_file import release_pages

        release_pages(source)
    # Chat models end a turn with their own token (SmolLM2's <|im_end|>), which config.json may not list.
    engine.eos_ids = engine.eos_ids | frozenset(tokenizer.eos_token_ids)
    return engine, tokenizer


def _quantized_source(source: str) -> bool:
    """A GGUF file (the embedded model too) or random:NAME:TYPE: weights that come as blocks."""
    return (source.endswith(".gguf") and os.path.isfile(source)) or (
        source.startswith(RANDOM_PREFIX) and ":" in source.removeprefix(RANDOM_PREFIX))


def _has_kernel(ecfg: EngineConfig) -> bool:
    return ecfg.native_kernels and load_qlinear() is not None


def _keeps_quantized_by_default(source: str, ecfg: EngineConfig) -> bool:
    """dtype auto on the CPU serves a quantized source as it is quantized, where the kernel exists: a
    quarter of float32's memory, and faster."""
    return _quantized_source(source) and ecfg.device == "cpu" and _has_kernel(ecfg)


def _check_quantize(source: str) -> None:
    """Quantizing at load is for float checkpoints; a GGUF file has its own block types."""
    if source.endswith(".gguf") or source.startswith(RANDOM_PREFIX):
        kind = "a GGUF file" if source.endswith(".gguf") else "a random model"
        raise ValueError(f"quantize is for a Hugging Face directory; {source!r} is {kind}: serve it "
                         f"with --dtype gguf (its own blocks; random:NAME:TYPE for random ones) or "
                         f"--dtype float32, without --quantize")


def _check_gguf_dtype(source: str, ecfg: EngineConfig) -> None:
    """dtype gguf multiplies a GGUF file's blocks as stored: refused, not silently dequantized (a 7B
    model's float copy would not fit), where that cannot happen."""
    if ecfg.quantize is None and not _quantized_source(source):
        raise ValueError(f"dtype gguf keeps a GGUF file's own quantization; {source!r} is neither a .gguf "
                         f"file nor {RANDOM_PREFIX}NAME:TYPE (a Hugging Face directory is quantized at load "
                         f"with --quantize)")
    if not _has_kernel(ecfg):
        raise ValueError("dtype gguf needs the quantized CPU kernel (native_kernels on and a C compiler); "
                         "--dtype float32 dequantizes the file instead")


def load_backend(source: str, config: EngineConfig | None = None,
                 chat_template: ChatTemplate | None = None) -> AsyncEngine:
    return AsyncEngine(lambda: load_engine(source, config), chat_template)

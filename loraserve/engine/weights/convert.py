"""`loraserve quantize SRC OUT.gguf`: a Hugging Face checkpoint, or a random model at a real shape, written
as a quantized GGUF file that llama.cpp (and `--dtype gguf`) reads.

A Hugging Face directory is quantized tensor by tensor as it is written (`quantize.target_type` decides
each tensor's type, as llama.cpp's quantizer would for that file type, and as it does when `--quantize`
quantizes at load, so both give the same blocks). A
`random:NAME:TYPE` source is the very model `serve --model random:NAME:TYPE` builds (same seed), its
blocks written as they are, with the embedded SmolLM2 tokenizer it uses: so a benchmark can hand
llama.cpp the same 7B-shaped weights.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gguf
import torch

from loraserve.engine.config import EngineConfig, ModelConfig, Quantization
from loraserve.engine.loader import random_model, random_tokenizer
from loraserve.engine.sources import EMBEDDED, RANDOM_PREFIX, embedded_gguf_path
from loraserve.engine.weights.gguf_writer import PlannedTensor, write_gguf
from loraserve.engine.weights.hf import LazyTensor, StateDict, hf_tensors
from loraserve.engine.weights.quant import QuantTensor, QuantType, Weight
from loraserve.engine.weights.quantize import file_type, quantize, target_type


def convert(source: str, out: Path, quantization: Quantization | None,
            overwrite: bool = False) -> ModelConfig:
    """Write `source` to `out`; returns the model's config. Raises ValueError (or FileNotFoundError,
    FileExistsError) with a message for the user."""
    if source == EMBEDDED or source.endswith(".gguf"):
        raise ValueError(f"{source} is a GGUF file already, with its own block types: serve it with "
                         "--dtype gguf (as stored) or --dtype float32 (dequantized)")
    if out.exists() and not overwrite:  # before minutes of work, not after
        raise FileExistsError(f"{out} exists (--force replaces it)")
    if source.startswith(RANDOM_PREFIX):
        config, tensors, kind = _random_plan(source.removeprefix(RANDOM_PREFIX), quantization)
        tokenizer_source = embedded_gguf_path()
    elif Path(source).is_dir():
        if quantization is None:
            raise ValueError(f"--type is required for a Hugging Face directory "
                             f"({', '.join(q.value for q in Quantization)})")
        config, tensors = _hf_plan(Path(source), quantization)
        tokenizer_source, kind = Path(source), file_type(quantization)
    else:
        raise FileNotFoundError(f"{source!r} is neither a Hugging Face directory nor "
                                f"{RANDOM_PREFIX}NAME[:TYPE]")
    write_gguf(out, config, tokenizer_source, tensors, overwrite=overwrite, file_type=kind)
    return config


def _hf_plan(root: Path, quantization: Quantization) -> tuple[ModelConfig, list[PlannedTensor]]:
    config, lazy = hf_tensors(root)
    plan = []
    for name, tensor in lazy.items():
        kind = target_type(name, tensor.shape, quantization, config)
        plan.append(PlannedTensor(name, tensor.shape, kind, partial(_read, tensor, kind)))
    return config, plan


def _read(tensor: LazyTensor, kind: QuantType | None) -> Weight:
    weight = tensor.load()
    return weight if kind is None else quantize(weight, kind)


def _random_plan(spec: str, quantization: Quantization | None
                 ) -> tuple[ModelConfig, list[PlannedTensor], gguf.LlamaFileType | None]:
    """The plan and the file's type (None: named after its tensors' types by the writer)."""
    name, _, stored = spec.partition(":")
    if stored and quantization is not None and stored != quantization.value:
        raise ValueError(f"{RANDOM_PREFIX}{spec} is random {stored} blocks already; leave --type out "
                         f"(or ask {RANDOM_PREFIX}{name}:{quantization.value})")
    if not stored and quantization is None:
        raise ValueError(f"--type is required for {RANDOM_PREFIX}{name} (float random weights)")
    kinds = {q.value: q for q in Quantization}
    made_as = quantization or kinds.get(stored)  # random Q5_K / Q6_K blocks: no Quantization of their own
    config, state = random_model(spec, random_tokenizer(), seed=EngineConfig().seed)
    plan = []
    for key, weight in state.items():
        shape = tuple(weight.shape)
        if isinstance(weight, QuantTensor):
            kind: QuantType | None = weight.qtype
        else:
            kind = None if quantization is None else target_type(key, shape, quantization, config)
        plan.append(PlannedTensor(key, shape, kind, partial(_take, state, key, kind)))
    return config, plan, None if made_as is None else file_type(made_as)


def _take(state: StateDict, name: str, kind: QuantType | None) -> Weight:
    """The tensor, out of the dict: once written it is not held any longer."""
    weight = state.pop(name)
    return quantize(weight, kind) if kind is not None and isinstance(weight, torch.Tensor) else weight

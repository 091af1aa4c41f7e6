"""A PEFT adapter folder written as llama.cpp's GGUF LoRA adapter, for the llama.cpp baseline.

What llama.cpp's `convert_lora_to_gguf.py` writes: `general.type` "adapter", `adapter.type` "lora",
`adapter.lora.alpha`, and per adapted projection `blk.N.<name>.weight.lora_a` [r, in] and `.lora_b`
[out, r] (numpy order; ggml's ne is the reverse, which is what llama.cpp checks against the base
tensor). The converter runs an adapter through the model's own tensor transforms, and for Llama that
permutes the q/k rows (llama.cpp rotates dims (2j, 2j+1) of a head where HF rotates (j, j + d/2)):
on `A` and `B` only `B` has those rows, so only `B` is permuted.

The numbers are the ones our engine uses: the folder is read by the engine's own adapter loader.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from loraserve.engine.config import ModelConfig, module_name
from loraserve.engine.lora.adapter_file import load_adapter
from loraserve.engine.weights.gguf_writer import llama_cpp_permute
from loraserve.types import AdapterRef

LLAMA_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]


def gguf_lora_tensors(peft_dir: Path, cfg: ModelConfig) -> tuple[float, dict[str, np.ndarray]]:
    """(adapter.lora.alpha, {GGUF tensor name: float32 array}) for the adapter in `peft_dir`.

    llama.cpp scales every module by alpha / (its rank): one alpha for the file. The first module
    sets it; a module whose own scale differs (rsLoRA, PEFT's rank or alpha patterns) gets the
    ratio folded into its `B`, so every adapter PEFT can express comes out exact."""
    weights = load_adapter(AdapterRef(peft_dir.name, str(peft_dir)), cfg, torch.float32)
    modules = sorted(weights.modules.items())
    if not modules:
        raise ValueError(f"{peft_dir}: the adapter adapts no module")
    first, (first_a, _) = modules[0]
    alpha = weights.scales.get(first, 1.0) * first_a.shape[0]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    out: dict[str, np.ndarray] = {}
    for (layer, target), (a, b) in modules:
        rank = a.shape[0]
        scale = weights.scales.get((layer, target), 1.0)
        b_np = b.float().numpy()
        if scale != alpha / rank:
            b_np = b_np * np.float32(scale * rank / alpha)
        if target in heads:
            b_np = llama_cpp_permute(b_np, heads[target])
        name = names.get_name(f"{module_name(layer, target)}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"no GGUF name for layer {layer} {target}")
        out[f"{name}.lora_a"] = np.ascontiguousarray(a.float().numpy())
        out[f"{name}.lora_b"] = np.ascontiguousarray(b_np, dtype=np.float32)
    return alpha, out


def write_gguf_lora(peft_dir: Path, out: Path, cfg: ModelConfig, arch: str = LLAMA_ARCH) -> Path:
    """Write the adapter in `peft_dir` to `out`; `arch` must be the model file's general.architecture
    (llama.cpp refuses an adapter of another)."""
    alpha, tensors = gguf_lora_tensors(peft_dir, cfg)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out

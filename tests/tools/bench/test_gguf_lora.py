"""The GGUF LoRA writer read back with gguf-py: llama.cpp's names, shapes, metadata and q/k row order.

The q/k oracle is `gguf_helpers.llama_cpp_permute`, the converter's permutation as the GGUF model tests
write it; tests/tools/bench/test_llamacpp.py checks the same files against llama.cpp itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from loraserve.engine.config import ModelConfig, module_name
from loraserve.peft import PROJ_SECTION
from loraserve.tools.bench.gguf_lora import write_gguf_lora
from loraserve.tools.bench.workload import WorkloadSpec, write_adapters
from loraserve.types import LORA_TARGETS

from gguf_helpers import GGUF_NAMES, llama_cpp_permute

# GQA: q and k rows are permuted with different head counts.
CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)
RANK = 4


def _adapter(tmp_path: Path, targets: tuple[str, ...] = LORA_TARGETS) -> Path:
    spec = WorkloadSpec(adapters=1, registered=1, rank=RANK, targets=targets, requests=1, prompt_len=1,
                        output_len=1)
    ref, = write_adapters(tmp_path / "peft", CFG, spec, torch.float32)
    return Path(ref.path)


def _read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _peft(folder: Path, layer: int, target: str) -> tuple[np.ndarray, np.ndarray]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    name = f"base_model.model.{module_name(layer, target)}"
    return tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]


def test_names_shapes_metadata_and_row_order(tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    fields, tensors = _read(write_gguf_lora(folder, tmp_path / "lora.gguf", CFG))
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 2 * RANK  # the bench's adapters: lora_alpha 2r, scale 2
    shapes = CFG.lora_shapes()
    expected = set()
    for layer in range(CFG.num_layers):
        for target in LORA_TARGETS:
            fan_in, fan_out = shapes[target]
            base = f"blk.{layer}.{GGUF_NAMES[f'{PROJ_SECTION[target]}.{target}']}.weight"
            expected |= {base + ".lora_a", base + ".lora_b"}
            a, b = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
            # ggml's ne, fastest first: A [r, in] is (in, r), B [out, r] is (r, out); llama.cpp checks
            # a.ne[0] and b.ne[1] against the base tensor's (in, out).
            assert a.shape.tolist() == [fan_in, RANK] and b.shape.tolist() == [RANK, fan_out]
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
            peft_a, peft_b = _peft(folder, layer, target)
            heads = {"q_proj": CFG.num_heads, "k_proj": CFG.num_kv_heads}.get(target)
            want_b = peft_b if heads is None else llama_cpp_permute(peft_b, heads)
            np.testing.assert_array_equal(a.data.reshape(RANK, fan_in), peft_a)
            np.testing.assert_array_equal(b.data.reshape(fan_out, RANK), want_b)
            if heads is not None:
                assert not np.array_equal(want_b, peft_b)  # the permutation really moves rows here
    assert set(tensors) == expected


def test_per_module_scales_fold_into_b(tmp_path: Path) -> None:
    """llama.cpp has one alpha a file (scale alpha / rank); rsLoRA and alpha_pattern scale otherwise."""
    folder = _adapter(tmp_path, targets=("q_proj", "down_proj"))
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf.update(use_rslora=True, lora_alpha=3.0, alpha_pattern={"down_proj": 12.0})
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    fields, tensors = _read(write_gguf_lora(folder, tmp_path / "lora.gguf", CFG))
    alpha = fields["adapter.lora.alpha"]
    assert isinstance(alpha, float)
    for target, peft_alpha in (("q_proj", 3.0), ("down_proj", 12.0)):
        _, fan_out = CFG.lora_shapes()[target]
        _, peft_b = _peft(folder, 1, target)
        name = f"blk.1.{'attn_q' if target == 'q_proj' else 'ffn_down'}.weight.lora_b"
        got = tensors[name].data.reshape(fan_out, RANK) * (alpha / RANK)
        want = peft_b * (peft_alpha / math.sqrt(RANK))  # PEFT's rsLoRA scale
        if target == "q_proj":
            want = llama_cpp_permute(want, CFG.num_heads)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_an_adapter_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = _adapter(tmp_path)
    other = ModelConfig(**{**CFG.__dict__, "hidden_size": 48})
    with pytest.raises(ValueError, match="shapes"):
        write_gguf_lora(folder, tmp_path / "lora.gguf", other)

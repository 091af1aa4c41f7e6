"""The compute backends of an engine, chosen once at construction (vLLM's LoRA backend selector is the
precedent): the decoder, the runner and the adapter pools then call what they were given and hold no
device or kernel branch of their own.

| concern | CPU float32, C kernels built | CPU otherwise | CUDA |
|---|---|---|---|
| projections | packed panels (`linear.c`); GGUF blocks (`qlinear.c`) | MKL layouts | [out, in] |
| attention | paged in place (`paged_attention.c`) | gather + SDPA | gather + `decode_attention` |
| LoRA | packed SGMV (`lora_sgmv.c`) | grouped GEMMs | grouped GEMMs (per-row gather in graphs) |
| layer glue | `layer_glue.c` | torch operators | torch operators |
| KV cache memory | huge pages (`kernels/huge_pages.py`) | huge pages | device memory |

Each kernel is built on first use; one that cannot be built (no compiler) leaves its concern on torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.kernels import cpu, huge_pages
from loraserve.engine.kernels.layer_glue import load_layer_glue
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.pool import LoraBackend
from loraserve.engine.lora.sgmv import SgmvLora
from loraserve.engine.models.step import Zeros
from loraserve.engine.ops.attention import Attention, DeviceAttention, GatherAttention, PagedAttention
from loraserve.engine.ops.glue import Glue, KernelGlue, TorchGlue
from loraserve.engine.ops.linear import (
    DeviceProjections,
    MklProjections,
    PackedProjections,
    Projections,
)
from loraserve.engine.ops.quant_linear import QuantProjections

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Ops:
    projections: Projections
    attention: Attention
    glue: Glue
    lora: LoraBackend
    zeros: Zeros  # the KV cache's memory


def _device_zeros(device: torch.device) -> Zeros:
    def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)
    return zeros


def select_ops(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, native_kernels: bool) -> Ops:
    if device.type == "cuda":
        return Ops(DeviceProjections(), DeviceAttention(cfg), TorchGlue(), GemmLora(), _device_zeros(device))
    kernels = native_kernels and dtype == torch.float32  # the C kernels are float32 only
    linear = cpu.load_linear() if kernels else None
    attention = cpu.load_paged_attention() if kernels else None
    glue = load_layer_glue() if kernels else None
    sgmv = cpu.load_lora_sgmv() if kernels else None
    qlinear = load_qlinear() if kernels else None
    # What MKL's dual layouts would add: the [in, out] copies of gate/up and lm_head.
    wide_bytes = ((cfg.num_layers * 2 * cfg.intermediate_size + cfg.vocab_size)
                  * cfg.hidden_size * dtype.itemsize)
    floats: Projections = PackedProjections(linear) if linear else MklProjections.for_model(wide_bytes)
    if qlinear:  # which build ran matters to a figure: AVX-VNNI and AVX-512 VNNI batch 1.2-2.7x AVX2
        log.info("CPU kernels: quantized dots on %s", qlinear.instructions)
    return Ops(
        projections=QuantProjections(qlinear, floats) if qlinear else floats,
        attention=PagedAttention(cfg, attention) if attention else GatherAttention(cfg),
        glue=KernelGlue(glue) if glue else TorchGlue(),
        lora=SgmvLora(sgmv) if sgmv else GemmLora(),
        zeros=huge_pages.zeros,
    )

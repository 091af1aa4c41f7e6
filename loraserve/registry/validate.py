"""Adapter validation: pure functions over bytes and files, no database (also driven by a fuzzer).

`parse_adapter_config` checks `adapter_config.json`; `validate_safetensors` checks
`adapter_model.safetensors` alone, or against a config when one is given. Both raise
InvalidFinetune (3039) with a message naming the field or tensor, expected vs found. What PEFT's names
and fields mean is loraserve.peft's, shared with the engine's loader.
"""

from __future__ import annotations

from pathlib import Path

from loraserve.peft import ALL_LINEAR, PROJ_SECTION, AdapterConfig
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.safetensors_header import DTYPE_SIZES, MAX_HEADER_BYTES, TensorInfo
from loraserve.registry.validate_config import MAX_ALPHA, MAX_CONFIG_BYTES, MAX_ENTRIES, parse_adapter_config
from loraserve.registry.validate_tensors import (
    AdapterTensors,
    LoraModule,
    check_against_config,
    check_finite,
    read_adapter_tensors,
)
from loraserve.types import ModelInfo

__all__ = [
    "ALL_LINEAR",
    "DTYPE_SIZES",
    "MAX_ALPHA",
    "MAX_CONFIG_BYTES",
    "MAX_ENTRIES",
    "MAX_HEADER_BYTES",
    "PROJ_SECTION",
    "AdapterConfig",
    "AdapterTensors",
    "LoraModule",
    "TensorInfo",
    "check_against_config",
    "check_finite",
    "parse_adapter_config",
    "read_adapter_tensors",
    "validate_safetensors",
]


def validate_safetensors(
    path: Path, base: ModelInfo, config: AdapterConfig | None, limits: RegistryLimits
) -> AdapterTensors:
    """Every check on an adapter file; the full read (NaN/Inf scan) runs last, after the cheap ones."""
    tensors = read_adapter_tensors(path, base, limits)
    if config is not None:
        check_against_config(tensors, config)
    check_finite(path, tensors)
    return tensors

"""Is `adapter_model.safetensors` a LoRA adapter of this base model, and of its adapter_config.json?

The file's framing (header, dtypes, offsets, packing) is checked first by
loraserve.registry.safetensors_header; this module names each tensor's layer, projection and factor, pairs
lora_A with lora_B, checks their shapes and ranks against the model and the limits, scans the values for
NaN/Inf, and cross-checks the tensors against the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loraserve.errors import InvalidFinetune
from loraserve.peft import (
    EXAMPLE_TENSOR_KEY,
    PROJ_SECTION,
    AdapterConfig,
    KeyFault,
    LoraFactor,
    TensorKeyError,
    matches_entry,
    module_name,
    parse_tensor_key,
)
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.safetensors_header import TensorInfo, fail, parse_header, read_header
from loraserve.registry.validate_config import show
from loraserve.types import ModelInfo

# An all-ones exponent is Inf or NaN in every IEEE-style float; checking bits covers bf16, which numpy lacks.
_NONFINITE_MASKS: dict[str, tuple[str, int]] = {
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}
_SCAN_CHUNK = 1 << 22  # elements per step: bounds the temporaries of a NaN scan of a large tensor


@dataclass(frozen=True)
class LoraModule:
    layer: int
    proj: str
    a: TensorInfo  # [r, in_features]
    b: TensorInfo  # [out_features, r]

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def key(self) -> str:
        return module_name(self.layer, self.proj)


@dataclass(frozen=True)
class AdapterTensors:
    data_offset: int  # where the data region starts in the file: 8 + header length
    modules: tuple[LoraModule, ...]  # sorted by (layer, projection)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(t for m in self.modules for t in (m.a, m.b))

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)


def _locate(t: TensorInfo, base: ModelInfo) -> tuple[int, str, LoraFactor]:
    """(layer, projection, factor) of a LoRA tensor; refuses anything else, naming it."""
    try:
        key = parse_tensor_key(t.name, base.lora_shapes, base.num_layers)
    except TensorKeyError as exc:
        match exc.fault:
            case KeyFault.NOT_LORA if t.name.endswith(".bias"):
                raise fail(
                    f"tensor {show(t.name)} is a bias: only lora_A/lora_B weight matrices are served (a "
                    f"base model's biases, such as Qwen2's q/k/v ones, are not LoRA targets); train with "
                    f"bias='none' and lora_bias=false"
                ) from None
            case KeyFault.NOT_LORA:
                raise fail(
                    f"tensor {show(t.name)} is not a LoRA weight of a decoder layer; only names like "
                    f"{EXAMPLE_TENSOR_KEY} are accepted (no embeddings, lm_head, norms or biases)"
                ) from None
            case KeyFault.UNKNOWN_MODULE:
                known = [f"{PROJ_SECTION[p]}.{p}" for p in base.lora_shapes if p in PROJ_SECTION]
                raise fail(
                    f"tensor {show(t.name)}: unknown module {exc.module}; expected one of {known}"
                ) from None
            case KeyFault.NO_SUCH_LAYER:
                raise fail(
                    f"tensor {show(t.name)}: layer {exc.layer} does not exist; the base model has layers "
                    f"0..{base.num_layers - 1}"
                ) from None
    return key.layer, key.target, key.factor


def _pair(
    found: dict[tuple[int, str, LoraFactor], TensorInfo], base: ModelInfo, limits: RegistryLimits
) -> list[LoraModule]:
    for (layer, proj, factor), t in found.items():
        if (layer, proj, factor.other) not in found:
            raise fail(f"tensor {show(t.name)} has no matching {factor.other.value} tensor")
    order = list(base.lora_shapes)
    modules = []
    for layer, proj in sorted({(k[0], k[1]) for k in found}, key=lambda k: (k[0], order.index(k[1]))):
        a, b = found[(layer, proj, LoraFactor.A)], found[(layer, proj, LoraFactor.B)]
        in_f, out_f = base.lora_shapes[proj]
        if len(a.shape) != 2 or a.shape[1] != in_f or a.shape[0] < 1:
            raise fail(
                f"tensor {show(a.name)}: expected shape [r, {in_f}] with r >= 1, found {show(list(a.shape))}"
            )
        r = a.shape[0]
        if r > limits.max_rank:
            raise fail(f"tensor {show(a.name)}: rank {r} exceeds the limit of {limits.max_rank}")
        if b.shape != (out_f, r):
            raise fail(f"tensor {show(b.name)}: expected shape [{out_f}, {r}], found {show(list(b.shape))}")
        modules.append(LoraModule(layer=layer, proj=proj, a=a, b=b))
    return modules


def read_adapter_tensors(path: Path, base: ModelInfo, limits: RegistryLimits) -> AdapterTensors:
    """Structure, names and shapes of an adapter file; reads only its header."""
    raw, data_offset, data_size = read_header(path)
    tensors, metadata = parse_header(raw, data_size)
    found: dict[tuple[int, str, LoraFactor], TensorInfo] = {}
    for t in tensors:
        where = _locate(t, base)
        if where in found:
            raise fail(f"tensor {show(t.name)} duplicates tensor {show(found[where].name)}")
        found[where] = t
    return AdapterTensors(
        data_offset=data_offset, modules=tuple(_pair(found, base, limits)), metadata=metadata
    )


def check_finite(path: Path, tensors: AdapterTensors) -> None:
    """Refuse NaN or Inf anywhere: one bad value would poison every token the adapter touches."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for t in tensors.tensors:
        utype, mask = _NONFINITE_MASKS[t.dtype]
        words = data[tensors.data_offset + t.begin : tensors.data_offset + t.end].view(utype)
        for start in range(0, words.size, _SCAN_CHUNK):
            bad = np.flatnonzero((words[start : start + _SCAN_CHUNK] & mask) == mask)
            if bad.size:
                raise fail(
                    f"tensor {show(t.name)}: expected finite values, found NaN or Inf at element "
                    f"{start + int(bad[0])}"
                )


def check_against_config(tensors: AdapterTensors, config: AdapterConfig) -> None:
    """The two files must describe the same adapter: targeted modules and ranks agree."""
    for m in tensors.modules:
        if not config.targets(m.layer, m.proj):
            raise InvalidFinetune(
                f"adapter_model.safetensors does not match adapter_config.json: tensor {show(m.a.name)} "
                f"adapts {m.key}, which target_modules {show(list(config.target_modules))} "
                f"(and layers_to_transform) exclude"
            )
        expected = config.rank_for(m.layer, m.proj)
        if m.rank != expected:
            raise InvalidFinetune(
                f"adapter_model.safetensors does not match adapter_config.json: tensor {show(m.a.name)} has "
                f"rank {m.rank}, expected {expected} (r / rank_pattern)"
            )
    for target in config.target_modules:
        if not any(matches_entry(m.key, target) for m in tensors.modules):
            raise InvalidFinetune(
                f"adapter_model.safetensors does not match adapter_config.json: target_modules lists "
                f"{target!r} but no tensor adapts it"
            )

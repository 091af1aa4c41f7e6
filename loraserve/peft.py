"""PEFT's LoRA conventions for the decoders served (Llama, Mistral, Gemma, Qwen2: the same seven projection
names), in one place for the registry and the engine.

Module names, the tensor keys of `adapter_model.safetensors`, and what `adapter_config.json` means
(target matching, rank/alpha patterns, scaling, model_type). Standard library only: the registry, which
never imports torch, checks uploads with the same rules the engine loads them with, so an adapter one
accepts the other accepts too.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, TypeVar

# Which block of a decoder layer owns each projection (a component of PEFT's module path), in layer order.
PROJ_SECTION: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
LORA_TARGETS: tuple[str, ...] = tuple(PROJ_SECTION)
# target_modules="all-linear": every linear layer but the output head, i.e. all seven projections.
ALL_LINEAR = "all-linear"
# PeftModel's own prefix on every tensor key it saves; models with adapters injected directly lack it.
PEFT_PREFIX = "base_model.model."


def module_name(layer: int, target: str) -> str:
    """HF's dotted name of a layer's projection, e.g. `model.layers.3.self_attn.q_proj`: what PEFT matches
    target_modules and rank/alpha patterns against."""
    return f"model.layers.{layer}.{PROJ_SECTION[target]}.{target}"


class LoraFactor(enum.Enum):
    A = "lora_A"  # [r, in_features]
    B = "lora_B"  # [out_features, r]

    @property
    def other(self) -> LoraFactor:
        return LoraFactor.B if self is LoraFactor.A else LoraFactor.A


# save_pretrained drops the adapter name from every key (`...q_proj.lora_A.weight`). A key that still holds
# one loads in PEFT only under that name, and PeftModel.from_pretrained loads as "default": so ".default" is
# accepted and any other name refused, since PEFT would skip those tensors without an error and serve an
# untrained adapter. The prefix is optional: transformers' load_adapter reads keys with or without it.
_TENSOR_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(0|[1-9][0-9]{0,5})\.([A-Za-z_]+)\.([A-Za-z0-9_]+)"
    r"\.(lora_A|lora_B)(?:\.default)?\.weight"
)
EXAMPLE_TENSOR_KEY = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"


class KeyFault(enum.Enum):
    NOT_LORA = enum.auto()  # not a lora_A/lora_B weight of a decoder layer's projection
    UNKNOWN_MODULE = enum.auto()  # a projection this model lacks, or under the wrong block
    NO_SUCH_LAYER = enum.auto()


@dataclass(frozen=True)
class TensorKey:
    layer: int
    target: str  # "q_proj" ...
    factor: LoraFactor


class TensorKeyError(ValueError):
    """A tensor key that names no LoRA factor of this model; `module` ("mlp.q_proj") and `layer` say what
    it named, where the key got that far."""

    def __init__(self, key: str, fault: KeyFault, module: str = "", layer: int = -1) -> None:
        super().__init__(f"tensor {key!r} is no LoRA weight of this model ({fault.name})")
        self.key, self.fault, self.module, self.layer = key, fault, module, layer


def parse_tensor_key(key: str, targets: Collection[str], num_layers: int) -> TensorKey:
    """The layer, projection and factor a safetensors key of a PEFT adapter holds, for a model with these
    projections and layers; raises TensorKeyError otherwise."""
    m = _TENSOR_KEY.fullmatch(key)
    if m is None:
        raise TensorKeyError(key, KeyFault.NOT_LORA)
    layer, section, target = int(m[1]), m[2], m[3]
    if target not in targets or PROJ_SECTION.get(target) != section:
        raise TensorKeyError(key, KeyFault.UNKNOWN_MODULE, module=f"{section}.{target}", layer=layer)
    if layer >= num_layers:
        raise TensorKeyError(key, KeyFault.NO_SUCH_LAYER, module=f"{section}.{target}", layer=layer)
    return TensorKey(layer, target, LoraFactor(m[4]))


def matches_entry(name: str, entry: str) -> bool:
    """PEFT's rule for one target_modules list entry: the module's full name or a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def is_targeted(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether PEFT's target_modules select the module `name`: a string is a regular expression over the
    whole name, a list holds names or dotted suffixes (check_target_module_exists)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(matches_entry(name, t) for t in target_modules)


_V = TypeVar("_V")


class PatternTable(Generic[_V]):
    """A rank_pattern or alpha_pattern, looked up as PEFT's get_pattern_key does: the first key, in the
    file's order, that matches the end of the module's name as a regular expression, after a dot or at the
    start. Compiled once: re's own cache holds 512 patterns, and a config may have thousands."""

    def __init__(self, patterns: Mapping[str, _V]) -> None:
        self._entries = [(re.compile(rf"(.*\.)?({key})$"), value) for key, value in patterns.items()]

    def get(self, layer: int, target: str, default: _V) -> _V:
        name = module_name(layer, target)
        return next((value for pattern, value in self._entries if pattern.match(name)), default)


# model_types that name the same decoder as another: the multimodal wrapper around a text model (Gemma 3's
# "gemma3" checkpoints hold a "gemma3_text" decoder, Mistral Small 3.1's "mistral3" a "mistral" one). An
# adapter trained on either loads on the other. The engine's family_of reads the same table for loading.
MODEL_TYPE_ALIASES: dict[str, str] = {"gemma3": "gemma3_text", "mistral3": "mistral"}
# Workers AI asks for one of three model_types whatever the version ("edit your adapter_config.json to
# include model_type as one of mistral, gemma or llama"), so a Gemma 3 finetune made for it says "gemma".
# Families it names none for (Qwen2) go by their own model_type only.
WORKERS_AI_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
}


def canonical_model_type(model_type: str) -> str:
    """The decoder a model_type names, lower-cased: "Gemma3" -> "gemma3_text"."""
    lowered = model_type.lower()
    return MODEL_TYPE_ALIASES.get(lowered, lowered)


def accepted_model_types(architecture: str) -> tuple[str, ...]:
    """Every adapter_config.json model_type that fits a base model of this architecture, sorted."""
    own = canonical_model_type(architecture)
    names = {own, *(alias for alias, target in MODEL_TYPE_ALIASES.items() if target == own)}
    workers_ai = WORKERS_AI_MODEL_TYPES.get(own)
    return tuple(sorted(names | ({workers_ai} if workers_ai else set())))


def model_type_matches(model_type: object, architecture: str) -> bool:
    """adapter_config.json's model_type against the base model's. Workers AI requires it but PEFT does not
    write it, so an absent one is taken to be right; case is ignored ("LLAMA"), aliases and Workers AI's
    family names are accepted (accepted_model_types)."""
    if model_type is None:
        return True
    return isinstance(model_type, str) and model_type.lower() in accepted_model_types(architecture)


@dataclass(frozen=True)
class LoraScaling:
    """The factor of B @ A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (LoraLayer.update_layer),
    alpha per module from alpha_pattern. The rank is the tensors' own."""

    lora_alpha: float
    use_rslora: bool = False
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    @cached_property
    def _alphas(self) -> PatternTable[float]:
        return PatternTable(self.alpha_pattern)

    def alpha_for(self, layer: int, target: str) -> float:
        return self._alphas.get(layer, target, self.lora_alpha)

    def scale(self, layer: int, target: str, rank: int) -> float:
        alpha = self.alpha_for(layer, target)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @classmethod
    def from_json(cls, conf: Mapping[str, Any]) -> LoraScaling:
        """From an adapter_config.json the registry checked at upload, so nothing is re-checked. A missing
        lora_alpha (refused at upload; a hand-made folder) falls back to r, a scale of 1."""
        return cls(
            lora_alpha=float(conf.get("lora_alpha", conf.get("r", 8))),
            use_rslora=bool(conf.get("use_rslora", False)),
            alpha_pattern={str(k): float(v) for k, v in (conf.get("alpha_pattern") or {}).items()},
        )


@dataclass(frozen=True)
class AdapterConfig:
    """A checked adapter_config.json (the registry parses it: validate_config.py)."""

    r: int
    lora_alpha: float
    # Plain module names or dotted suffixes of them ("q_proj", "self_attn.q_proj", "layers.0.mlp.up_proj").
    target_modules: tuple[str, ...]
    use_rslora: bool
    model_type: str
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None

    def targets(self, layer: int, target: str) -> bool:
        """Whether PEFT would have put an adapter on this module."""
        if self.layers_to_transform is not None and layer not in self.layers_to_transform:
            return False
        return is_targeted(self.target_modules, module_name(layer, target))

    @cached_property
    def _ranks(self) -> PatternTable[int]:
        return PatternTable(self.rank_pattern)

    def rank_for(self, layer: int, target: str) -> int:
        return self._ranks.get(layer, target, self.r)

    def alpha_for(self, layer: int, target: str) -> float:
        return self.scaling.alpha_for(layer, target)

    @cached_property
    def scaling(self) -> LoraScaling:
        return LoraScaling(self.lora_alpha, self.use_rslora, self.alpha_pattern)

    @property
    def projections(self) -> frozenset[str]:
        return frozenset(t.rsplit(".", 1)[-1] for t in self.target_modules)

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

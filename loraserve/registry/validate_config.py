"""Parsing `adapter_config.json` (PEFT's LoraConfig) against the base model, trusting nothing in it."""

from __future__ import annotations

import json
import re
import reprlib

from loraserve.errors import InvalidFinetune
from loraserve.peft import (
    ALL_LINEAR,
    LORA_TARGETS,
    PROJ_SECTION,
    AdapterConfig,
    accepted_model_types,
    model_type_matches,
)
from loraserve.registry.limits import RegistryLimits
from loraserve.types import ModelInfo

__all__ = ["ALL_LINEAR", "MAX_ALPHA", "MAX_CONFIG_BYTES", "MAX_ENTRIES", "PROJ_SECTION", "AdapterConfig",
           "parse_adapter_config", "show"]

MAX_CONFIG_BYTES = 1 << 20
# Far above anything PEFT writes (a few names, or one full path per adapted module of a 100+ layer model),
# and low enough that matching every module against every entry stays cheap.
MAX_ENTRIES = 4096
# float16's largest value: a scaling factor (alpha / r) beyond it is no trained adapter, and a huge int
# would not even convert to a float.
MAX_ALPHA = 65504.0

# PEFT matches module names by suffix or by regex. Only plain dotted names are accepted here: a regex
# from an upload would be run against every module (ReDoS), and its meaning would be hard to report. The
# patterns are still looked up as PEFT does (loraserve.peft.pattern_value), where a dot matches any character.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")

# PEFT's bias options train bias vectors beside A and B. None are served, and Qwen2's q/k/v biases, which
# its checkpoints carry, are the base model's own and no LoRA target either.
_NO_BIAS = ("{field}: only lora_A/lora_B matrices are served, no bias terms (a base model's biases, "
            "such as Qwen2's q/k/v ones, are not LoRA targets); train with bias='none' and lora_bias=false")

# Options that change the forward pass in ways this server does not implement; any truthy value refuses.
_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA (use_dora) is not supported; train with use_dora=false",
    "lora_bias": _NO_BIAS.format(field="lora_bias is not supported"),
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "arrow routing (arrow_config) is not supported",
    "layer_replication": "layer_replication is not supported",
    "modules_to_save": "modules_to_save is not supported: only LoRA A/B matrices can be served",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters is not supported; use target_modules",
}


def _fail(message: str) -> InvalidFinetune:
    return InvalidFinetune(f"adapter_config.json: {message}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 80, 40, 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 8


def show(value: object) -> str:
    """A bounded repr for error messages: an upload's value may be 1 MB long or nested 1000 deep, and
    repr() escapes what JSON cannot carry (lone surrogates)."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int past Python's 4300-digit str limit; defensive
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _rank(name: str, value: object, limits: RegistryLimits) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limits.max_rank:
        return value
    raise _fail(f"{name} must be an integer in 1..{limits.max_rank}, found {show(value)}")


def _positive_number(name: str, value: object) -> float:
    # bool is an int in Python, and json.loads accepts NaN and Infinity: refuse all three. The bound is
    # checked before any conversion: float(10**400) raises OverflowError.
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= MAX_ALPHA:
        return float(value)
    raise _fail(f"{name} must be a finite number in (0, {MAX_ALPHA:g}], found {show(value)}")


def _module_name(field_name: str, value: object, base: ModelInfo) -> str:
    if not isinstance(value, str) or not _PLAIN_PATH.fullmatch(value):
        raise _fail(
            f"{field_name} entries must be module names like 'q_proj' (regular expressions are not "
            f"supported), found {show(value)}"
        )
    if value.rsplit(".", 1)[-1] not in base.lora_shapes:
        raise _fail(f"{field_name}: unknown module {show(value)}; expected one of {sorted(base.lora_shapes)}")
    return value


def _target_modules(value: object, base: ModelInfo) -> tuple[str, ...]:
    if value == ALL_LINEAR:
        return tuple(t for t in LORA_TARGETS if t in base.lora_shapes)
    if isinstance(value, str):
        # PEFT treats a string as a regex over module names; accept it only when it is one known name.
        return (_module_name("target_modules", value, base),)
    if not isinstance(value, list) or not value:
        raise _fail(
            f"target_modules must be a non-empty list of module names or 'all-linear', found {show(value)}"
        )
    _at_most("target_modules", value)
    return tuple(dict.fromkeys(_module_name("target_modules", v, base) for v in value))


def _at_most(name: str, value: list[object] | dict[str, object]) -> None:
    if len(value) > MAX_ENTRIES:
        raise _fail(f"{name} has {len(value)} entries, expected at most {MAX_ENTRIES}")


def _pattern(name: str, value: object, base: ModelInfo) -> dict[str, object]:
    """A rank/alpha pattern's entries with checked keys, in the file's order (PEFT's first match wins)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{name} must be an object, found {show(value)}")
    _at_most(name, value)
    return {_module_name(name, k, base): v for k, v in value.items()}


def _layers(value: object, base: ModelInfo) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]  # PEFT also takes a single int
    _at_most("layers_to_transform", items)
    layers: set[int] = set()
    for i in items:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < base.num_layers:
            raise _fail(
                f"layers_to_transform must be layer indices in 0..{base.num_layers - 1}, found {show(value)}"
            )
        layers.add(i)
    if not layers:
        raise _fail("layers_to_transform must not be empty")
    return tuple(sorted(layers))


def _require(obj: dict[str, object], key: str, ok: bool, expected: str) -> None:
    if key in obj and not ok:
        raise _fail(f"{key} must be {expected}, found {show(obj[key])}")


def _load_json(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _fail(f"not valid UTF-8 JSON: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:  # says where: "Expecting ',' delimiter: line 1 column 9 (char 8)"
        raise _fail(f"not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise _fail("not valid UTF-8 JSON: nested too deeply") from None
    except ValueError as exc:  # an integer literal past Python's 4300-digit limit
        raise _fail(f"not valid UTF-8 JSON: {exc}") from None


def parse_adapter_config(data: bytes, base: ModelInfo, limits: RegistryLimits) -> AdapterConfig:
    """Parse and check one `adapter_config.json`; raises InvalidFinetune naming the offending field."""
    if len(data) > MAX_CONFIG_BYTES:
        raise _fail(f"file is {len(data)} bytes, expected at most {MAX_CONFIG_BYTES}")
    obj = _load_json(data)
    if not isinstance(obj, dict):
        raise _fail(f"expected a JSON object, found {type(obj).__name__}")
    _require(obj, "peft_type", obj.get("peft_type") == "LORA", "'LORA'")
    if obj.get("bias") not in ("none", None):
        raise _fail(_NO_BIAS.format(field=f"bias must be 'none', found {show(obj['bias'])}"))
    _require(obj, "fan_in_fan_out", obj.get("fan_in_fan_out") in (False, None), "false")
    _require(obj, "use_rslora", isinstance(obj.get("use_rslora"), bool | None), "a boolean")
    for key, why in _UNSUPPORTED.items():
        if obj.get(key) not in (None, False, [], {}):
            raise _fail(why)
    if not model_type_matches(obj.get("model_type"), base.architecture):
        accepted = " or ".join(repr(t) for t in accepted_model_types(base.architecture))
        raise _fail(f"model_type must be {accepted} for this base model, found {show(obj['model_type'])}")
    if "r" not in obj:
        raise _fail("r is required")
    if "lora_alpha" not in obj:
        raise _fail("lora_alpha is required")
    if "target_modules" not in obj:
        raise _fail("target_modules is required")
    return AdapterConfig(
        r=_rank("r", obj["r"], limits),
        lora_alpha=_positive_number("lora_alpha", obj["lora_alpha"]),
        target_modules=_target_modules(obj["target_modules"], base),
        use_rslora=bool(obj.get("use_rslora") or False),
        model_type=base.architecture,
        rank_pattern={
            k: _rank(f"rank_pattern[{show(k)}]", v, limits)
            for k, v in _pattern("rank_pattern", obj.get("rank_pattern"), base).items()
        },
        alpha_pattern={
            k: _positive_number(f"alpha_pattern[{show(k)}]", v)
            for k, v in _pattern("alpha_pattern", obj.get("alpha_pattern"), base).items()
        },
        layers_to_transform=_layers(obj.get("layers_to_transform"), base),
    )

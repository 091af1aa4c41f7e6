"""Checking `adapter_model.safetensors` from its raw bytes, without trusting its header.

The safetensors library would happily load what it is given; an upload can claim any length, shape
or offset, so every number is checked against the file before anything is read at an offset. What is
accepted here must also load with the library when a /run needs it (the engine uses it): the data region
packed, no duplicate keys, no NaN literals or "-0", no strings that are not valid UTF-8.
"""

from __future__ import annotations

import itertools
import json
import math
import os
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
from loraserve.registry.validate_config import show
from loraserve.types import ModelInfo

# A real adapter's header is ~150 bytes a tensor (a 128-layer model adapted everywhere: ~270 KB); the
# rest of the cap is room for metadata. json.loads builds up to ~25 bytes of Python objects per header
# byte ("[[],[],..."), so the cap also bounds what a hostile header costs to parse (~100 MB, not GBs).
MAX_HEADER_BYTES = 4 << 20
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
DTYPE_SIZES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
# An all-ones exponent is Inf or NaN in every IEEE-style float; checking bits covers bf16, which numpy lacks.
_NONFINITE_MASKS: dict[str, tuple[str, int]] = {
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}
_SCAN_CHUNK = 1 << 22  # elements per step: bounds the temporaries of a NaN scan of a large tensor
_MAX_NDIM = 8


def _fail(message: str) -> InvalidFinetune:
    return InvalidFinetune(f"adapter_model.safetensors: {message}")


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as written in the file
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data region
    end: int


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


def _read_header(path: Path) -> tuple[bytes, int, int]:
    """(header bytes, data region offset, data region size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _fail(f"file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise _fail(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if n > size - 8:
            raise _fail(f"header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        raw = f.read(n)
    if len(raw) != n:
        raise _fail("file changed while being read")
    return raw, 8 + n, size - 8 - n


def _non_negative_ints(value: object) -> list[int] | None:
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def _tensor(name: str, info: object, data_size: int) -> TensorInfo:
    if not isinstance(info, dict):
        raise _fail(f"tensor {show(name)}: header entry must be an object, found {show(info)}")
    extra = [k for k in info if k not in _ENTRY_FIELDS]
    if extra:
        # The library ignores unknown fields but still parses them, more strictly than json.loads.
        raise _fail(
            f"tensor {show(name)}: unexpected field {show(extra[0])}; expected only {list(_ENTRY_FIELDS)}"
        )
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _fail(
            f"tensor {show(name)}: dtype {show(dtype)} is not supported; expected one of {list(DTYPE_SIZES)}"
        )
    shape = _non_negative_ints(info.get("shape"))
    if shape is None or len(shape) > _MAX_NDIM:
        raise _fail(
            f"tensor {show(name)}: shape must be a list of non-negative integers, "
            f"found {show(info.get('shape'))}"
        )
    offsets = _non_negative_ints(info.get("data_offsets"))
    if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _fail(
            f"tensor {show(name)}: data_offsets must be [begin, end] with 0 <= begin <= end, "
            f"found {show(info.get('data_offsets'))}"
        )
    begin, end = offsets
    if end > data_size:
        raise _fail(
            f"tensor {show(name)}: data_offsets end {show(end)} is beyond the data region ({data_size} bytes)"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise _fail(
            f"tensor {show(name)}: data_offsets span {end - begin} bytes, expected {show(expected)} "
            f"for shape {show(shape)} of {dtype}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_no_overlap(tensors: list[TensorInfo]) -> None:
    spans = sorted((t for t in tensors if t.end > t.begin), key=lambda t: (t.begin, t.end))
    # Sorted by start, any overlap shows up between neighbours.
    for prev, cur in itertools.pairwise(spans):
        if cur.begin < prev.end:
            raise _fail(
                f"tensor {show(cur.name)}: data_offsets [{cur.begin}, {cur.end}] overlap tensor "
                f"{show(prev.name)} [{prev.begin}, {prev.end}]"
            )


def _check_packed(tensors: list[TensorInfo], data_size: int) -> None:
    """The library loads a data region only if its tensors fill it back to back from byte 0 to the end."""
    position = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != position:  # overlaps are refused before this runs: a gap
            raise _fail(
                f"tensor {show(t.name)}: data_offsets begin {t.begin} leaves bytes {position}..{t.begin} "
                f"unused; tensors must fill the data region back to back"
            )
        position = t.end
    if position != data_size:
        raise _fail(
            f"{data_size - position} bytes after the last tensor (the data region is {data_size} bytes, "
            f"its tensors end at {position}): the header does not describe the whole file"
        )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads would keep the last of two equal keys silently; the library refuses a repeated field, and
    # a repeated tensor name is a broken writer at best.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _fail(f"header has the key {show(key)} twice")
            seen.add(key)
    return obj


def _no_constant(name: str) -> object:
    raise _fail(f"header is not valid JSON: {name} is not a JSON number")


def _integer(text: str) -> int | float:
    # "-0" is an int to json.loads but a float to the library, which refuses it as a shape or offset.
    return -0.0 if text == "-0" else int(text)


def _load_header(raw: bytes) -> object:
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_integer,
        )
    except UnicodeDecodeError as exc:
        raise _fail(f"header is not valid UTF-8 JSON: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise _fail(f"header is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise _fail("header is not valid UTF-8 JSON: nested too deeply") from None
    except ValueError as exc:  # an integer literal past Python's 4300-digit limit
        raise _fail(f"header is not valid UTF-8 JSON: {exc}") from None


def _utf8(text: str) -> bool:
    # A JSON escape can make a lone surrogate ("\ud800"), which is no UTF-8 and which the library refuses.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_header(raw: bytes, data_size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    header = _load_header(raw)
    if not isinstance(header, dict):
        raise _fail(f"header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _fail(f"__metadata__ must map strings to strings, found {show(metadata)}")
    for key, value in metadata.items():
        if not isinstance(value, str) or not _utf8(key) or not _utf8(value):
            raise _fail(f"__metadata__ must map strings to strings, found {show(key)}: {show(value)}")
    tensors = [_tensor(name, info, data_size) for name, info in header.items()]
    if not tensors:
        raise _fail("no tensors")
    _check_no_overlap(tensors)
    _check_packed(tensors, data_size)
    return tensors, metadata


def _locate(t: TensorInfo, base: ModelInfo) -> tuple[int, str, LoraFactor]:
    """(layer, projection, factor) of a LoRA tensor; refuses anything else, naming it."""
    try:
        key = parse_tensor_key(t.name, base.lora_shapes, base.num_layers)
    except TensorKeyError as exc:
        match exc.fault:
            case KeyFault.NOT_LORA if t.name.endswith(".bias"):
                raise _fail(
                    f"tensor {show(t.name)} is a bias: only lora_A/lora_B weight matrices are served (a "
                    f"base model's biases, such as Qwen2's q/k/v ones, are not LoRA targets); train with "
                    f"bias='none' and lora_bias=false"
                ) from None
            case KeyFault.NOT_LORA:
                raise _fail(
                    f"tensor {show(t.name)} is not a LoRA weight of a decoder layer; only names like "
                    f"{EXAMPLE_TENSOR_KEY} are accepted (no embeddings, lm_head, norms or biases)"
                ) from None
            case KeyFault.UNKNOWN_MODULE:
                known = [f"{PROJ_SECTION[p]}.{p}" for p in base.lora_shapes if p in PROJ_SECTION]
                raise _fail(
                    f"tensor {show(t.name)}: unknown module {exc.module}; expected one of {known}"
                ) from None
            case KeyFault.NO_SUCH_LAYER:
                raise _fail(
                    f"tensor {show(t.name)}: layer {exc.layer} does not exist; the base model has layers "
                    f"0..{base.num_layers - 1}"
                ) from None
    return key.layer, key.target, key.factor


def _pair(
    found: dict[tuple[int, str, LoraFactor], TensorInfo], base: ModelInfo, limits: RegistryLimits
) -> list[LoraModule]:
    for (layer, proj, factor), t in found.items():
        if (layer, proj, factor.other) not in found:
            raise _fail(f"tensor {show(t.name)} has no matching {factor.other.value} tensor")
    order = list(base.lora_shapes)
    modules = []
    for layer, proj in sorted({(k[0], k[1]) for k in found}, key=lambda k: (k[0], order.index(k[1]))):
        a, b = found[(layer, proj, LoraFactor.A)], found[(layer, proj, LoraFactor.B)]
        in_f, out_f = base.lora_shapes[proj]
        if len(a.shape) != 2 or a.shape[1] != in_f or a.shape[0] < 1:
            raise _fail(
                f"tensor {show(a.name)}: expected shape [r, {in_f}] with r >= 1, found {show(list(a.shape))}"
            )
        r = a.shape[0]
        if r > limits.max_rank:
            raise _fail(f"tensor {show(a.name)}: rank {r} exceeds the limit of {limits.max_rank}")
        if b.shape != (out_f, r):
            raise _fail(f"tensor {show(b.name)}: expected shape [{out_f}, {r}], found {show(list(b.shape))}")
        modules.append(LoraModule(layer=layer, proj=proj, a=a, b=b))
    return modules


def read_adapter_tensors(path: Path, base: ModelInfo, limits: RegistryLimits) -> AdapterTensors:
    """Structure, names and shapes of an adapter file; reads only its header."""
    raw, data_offset, data_size = _read_header(path)
    tensors, metadata = _parse_header(raw, data_size)
    found: dict[tuple[int, str, LoraFactor], TensorInfo] = {}
    for t in tensors:
        where = _locate(t, base)
        if where in found:
            raise _fail(f"tensor {show(t.name)} duplicates tensor {show(found[where].name)}")
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
                raise _fail(
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

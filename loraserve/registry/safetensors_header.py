"""Is `adapter_model.safetensors` a well-formed safetensors file? Checked from its raw bytes.

An upload is untrusted bytes: it can claim any length, shape or offset, so every number is checked against
the file before anything is read at an offset, and nothing is handed to the safetensors library first. What
is accepted here must also load with the library when a /run needs it (the engine uses it): the data region
packed, no duplicate keys, no NaN literals or "-0", no strings that are not valid UTF-8. Whether the tensors
make a LoRA adapter of the base model is loraserve.registry.validate_tensors'.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from loraserve.errors import InvalidFinetune
from loraserve.registry.validate_config import show

# A real adapter's header is ~150 bytes a tensor (a 128-layer model adapted everywhere: ~270 KB); the
# rest of the cap is room for metadata. json.loads builds up to ~25 bytes of Python objects per header
# byte ("[[],[],..."), so the cap also bounds what a hostile header costs to parse (~100 MB, not GBs).
MAX_HEADER_BYTES = 4 << 20
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
DTYPE_SIZES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_NDIM = 8


def fail(message: str) -> InvalidFinetune:
    """The error for a bad adapter file; validate_tensors raises it too, so messages share one prefix."""
    return InvalidFinetune(f"adapter_model.safetensors: {message}")


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as written in the file
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data region
    end: int


def read_header(path: Path) -> tuple[bytes, int, int]:
    """(header bytes, data region offset, data region size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise fail(f"file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise fail(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if n > size - 8:
            raise fail(f"header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        raw = f.read(n)
    if len(raw) != n:
        raise fail("file changed while being read")
    return raw, 8 + n, size - 8 - n


def _non_negative_ints(value: object) -> list[int] | None:
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def _tensor(name: str, info: object, data_size: int) -> TensorInfo:
    if not isinstance(info, dict):
        raise fail(f"tensor {show(name)}: header entry must be an object, found {show(info)}")
    extra = [k for k in info if k not in _ENTRY_FIELDS]
    if extra:
        # The library ignores unknown fields but still parses them, more strictly than json.loads.
        raise fail(
            f"tensor {show(name)}: unexpected field {show(extra[0])}; expected only {list(_ENTRY_FIELDS)}"
        )
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise fail(
            f"tensor {show(name)}: dtype {show(dtype)} is not supported; expected one of {list(DTYPE_SIZES)}"
        )
    shape = _non_negative_ints(info.get("shape"))
    if shape is None or len(shape) > _MAX_NDIM:
        raise fail(
            f"tensor {show(name)}: shape must be a list of non-negative integers, "
            f"found {show(info.get('shape'))}"
        )
    offsets = _non_negative_ints(info.get("data_offsets"))
    if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise fail(
            f"tensor {show(name)}: data_offsets must be [begin, end] with 0 <= begin <= end, "
            f"found {show(info.get('data_offsets'))}"
        )
    begin, end = offsets
    if end > data_size:
        raise fail(
            f"tensor {show(name)}: data_offsets end {show(end)} is beyond the data region ({data_size} bytes)"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise fail(
            f"tensor {show(name)}: data_offsets span {end - begin} bytes, expected {show(expected)} "
            f"for shape {show(shape)} of {dtype}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_no_overlap(tensors: list[TensorInfo]) -> None:
    spans = sorted((t for t in tensors if t.end > t.begin), key=lambda t: (t.begin, t.end))
    # Sorted by start, any overlap shows up between neighbours.
    for prev, cur in itertools.pairwise(spans):
        if cur.begin < prev.end:
            raise fail(
                f"tensor {show(cur.name)}: data_offsets [{cur.begin}, {cur.end}] overlap tensor "
                f"{show(prev.name)} [{prev.begin}, {prev.end}]"
            )


def _check_packed(tensors: list[TensorInfo], data_size: int) -> None:
    """The library loads a data region only if its tensors fill it back to back from byte 0 to the end."""
    position = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != position:  # overlaps are refused before this runs: a gap
            raise fail(
                f"tensor {show(t.name)}: data_offsets begin {t.begin} leaves bytes {position}..{t.begin} "
                f"unused; tensors must fill the data region back to back"
            )
        position = t.end
    if position != data_size:
        raise fail(
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
                raise fail(f"header has the key {show(key)} twice")
            seen.add(key)
    return obj


def _no_constant(name: str) -> object:
    raise fail(f"header is not valid JSON: {name} is not a JSON number")


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
        raise fail(f"header is not valid UTF-8 JSON: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise fail(f"header is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise fail("header is not valid UTF-8 JSON: nested too deeply") from None
    except ValueError as exc:  # an integer literal past Python's 4300-digit limit
        raise fail(f"header is not valid UTF-8 JSON: {exc}") from None


def _utf8(text: str) -> bool:
    # A JSON escape can make a lone surrogate ("\ud800"), which is no UTF-8 and which the library refuses.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(raw: bytes, data_size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    header = _load_header(raw)
    if not isinstance(header, dict):
        raise fail(f"header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise fail(f"__metadata__ must map strings to strings, found {show(metadata)}")
    for key, value in metadata.items():
        if not isinstance(value, str) or not _utf8(key) or not _utf8(value):
            raise fail(f"__metadata__ must map strings to strings, found {show(key)}: {show(value)}")
    tensors = [_tensor(name, info, data_size) for name, info in header.items()]
    if not tensors:
        raise fail("no tensors")
    _check_no_overlap(tensors)
    _check_packed(tensors, data_size)
    return tensors, metadata

"""A GGUF file's metadata read in one pass into Python values, its tensors as gguf-py reads them.

Why: gguf-py's reader keeps every element of every metadata array as numpy views of its own, two per
string: the embedded SmolLM2's 49,152 tokens and 48,900 merges are ~200,000 views, ~2 s of every load
of the model (or of a random model, which borrows its tokenizer), where the bytes themselves take tens of
milliseconds to read. `GGUFFile` reads the key/value section with `struct` instead (`values`), then lets
gguf-py read the tensor infos and map the tensors as before. Its `fields` hold the scalar keys only (the
reader's own alignment check reads one); `gguf_field` reads either kind of reader.
"""

from __future__ import annotations

import struct
from typing import Any

import gguf
import numpy as np

_T = gguf.GGUFValueType
# the fixed-size value types: struct format, numpy dtype (little-endian, as GGUF files are written)
_FIXED: dict[int, tuple[str, str]] = {
    _T.UINT8: ("<B", "<u1"), _T.INT8: ("<b", "<i1"), _T.UINT16: ("<H", "<u2"), _T.INT16: ("<h", "<i2"),
    _T.UINT32: ("<I", "<u4"), _T.INT32: ("<i", "<i4"), _T.FLOAT32: ("<f", "<f4"), _T.BOOL: ("<?", "?"),
    _T.UINT64: ("<Q", "<u8"), _T.INT64: ("<q", "<i8"), _T.FLOAT64: ("<d", "<f8"),
}


class GGUFFile(gguf.GGUFReader):
    """gguf.GGUFReader with the metadata in `values`: str, bool, int or float for scalars, a list of str
    for string arrays, a numpy array for arrays of numbers (np.zeros(0) when empty)."""

    values: dict[str, Any]

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order == "S":  # a big-endian file on this host (or the reverse): gguf-py's own way
            offs = super()._build_fields(offs, count)
            self.values = {k: field_value(f) for k, f in self.fields.items() if not k.startswith("GGUF.")}
            return offs
        try:
            return self._read_values(memoryview(self.data.data).cast("B"), offs, count)
        except struct.error as e:
            raise ValueError(f"GGUF metadata: the file ends inside its key/value section ({e})") from None

    def _read_values(self, buf: memoryview, offs: int, count: int) -> int:
        self.values = {}
        for _ in range(count):
            start = offs
            key, offs = _string(buf, offs)
            (kind,) = struct.unpack_from("<I", buf, offs)
            offs += 4
            name = key.decode("utf-8")
            if kind == _T.ARRAY:
                self.values[name], offs = _array(buf, offs)
                continue
            value, offs = _scalar(buf, offs, kind, strict=True)
            self.values[name] = value
            part = np.array([value]) if kind == _T.STRING else np.array([value], dtype=_FIXED[kind][1])
            self.fields[name] = gguf.ReaderField(start, name, [part], [0], [_T(kind)])
        return offs


def _string(buf: memoryview, offs: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", buf, offs)
    end = offs + 8 + n
    if end > len(buf):
        raise ValueError("GGUF metadata: a string runs past the end of the file")
    return bytes(buf[offs + 8:end]), end


def _scalar(buf: memoryview, offs: int, kind: int, strict: bool) -> tuple[Any, int]:
    if kind == _T.STRING:
        raw, offs = _string(buf, offs)
        return raw.decode("utf-8", errors="strict" if strict else "replace"), offs
    if kind not in _FIXED:
        raise ValueError(f"GGUF metadata: unknown value type {kind}")
    fmt = _FIXED[kind][0]
    return struct.unpack_from(fmt, buf, offs)[0], offs + struct.calcsize(fmt)


def _array(buf: memoryview, offs: int) -> tuple[Any, int]:
    """An array's elements (nested arrays flattened, as gguf-py does) and the offset after it."""
    kind, n = struct.unpack_from("<IQ", buf, offs)
    offs += 12
    if kind in _FIXED:
        dtype = np.dtype(_FIXED[kind][1])
        if offs + n * dtype.itemsize > len(buf):
            raise ValueError("GGUF metadata: an array runs past the end of the file")
        values = np.frombuffer(buf, dtype=dtype, count=n, offset=offs).astype(dtype.newbyteorder("="))
        return (values if n else np.zeros(0)), offs + n * dtype.itemsize
    items: list[Any] = []
    for _ in range(n):
        if kind == _T.ARRAY:
            inner, offs = _array(buf, offs)
            items.extend(inner)
        else:
            value, offs = _scalar(buf, offs, kind, strict=False)
            items.append(value)
    return items, offs


def field_value(field: gguf.ReaderField) -> Any:
    """A gguf-py field's value, as `GGUFFile.values` holds them."""
    kind = field.types[0]
    if kind == _T.ARRAY:
        if field.types[-1] == _T.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return np.zeros(0)
        return np.concatenate([field.parts[i] for i in field.data])
    if kind == _T.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    value = field.parts[field.data[0]][0]
    return value.item() if hasattr(value, "item") else value


def gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar, str or list (arrays of numbers come back as numpy arrays), from
    either reader."""
    if isinstance(reader, GGUFFile):
        return reader.values.get(key, default)
    field = reader.fields.get(key)
    return default if field is None else field_value(field)

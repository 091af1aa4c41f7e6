"""GGUFFile's metadata, read in one pass, against gguf-py's reader on the same files: every value type,
the embedded model, tensor infos unchanged; a truncated file is refused with a ValueError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from loraserve.engine.sources import embedded_gguf_path
from loraserve.engine.weights.gguf_meta import GGUFFile, field_value, gguf_field


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, np.ndarray):
        return isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want)
    return type(got) is type(want) and got == want


def _check(path: Path) -> GGUFFile:
    fast, slow = GGUFFile(path), gguf.GGUFReader(path)
    keys = {k for k in slow.fields if not k.startswith("GGUF.")}
    assert set(fast.values) == keys
    for key in keys:
        assert _same(fast.values[key], field_value(slow.fields[key])), key
        assert _same(gguf_field(fast, key), gguf_field(slow, key)), key
    assert fast.data_offset == slow.data_offset
    assert [(t.name, t.tensor_type, t.data.shape, t.data_offset) for t in fast.tensors] == \
        [(t.name, t.tensor_type, t.data.shape, t.data_offset) for t in slow.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(fast.tensors, slow.tensors, strict=True))
    return fast


def _every_type(path: Path) -> None:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -0.125)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.strs", ["a", "", "ünï", "b c"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.empty", [])
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_value_type_as_gguf_py_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    _every_type(path)
    f = _check(path)
    assert f.values["t.str"] == "héllo ✓" and f.values["t.strs"] == ["a", "", "ünï", "b c"]
    assert f.values["t.u64"] == 2**63 + 5 and f.values["t.bool"] is True
    assert gguf_field(f, "t.missing", 7) == 7


def test_the_embedded_model_as_gguf_py_reads_it() -> None:
    f = _check(embedded_gguf_path())
    assert len(f.values["tokenizer.ggml.tokens"]) == 49152


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"
    _every_type(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:data.index(b"t.strs") + 40])  # inside the string array
    with pytest.raises(ValueError):
        GGUFFile(cut)

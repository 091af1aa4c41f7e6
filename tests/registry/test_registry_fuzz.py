"""Fuzzing the adapter parsers: `validate_safetensors` and `parse_adapter_config` over arbitrary bytes,
structured mutations of valid files and hostile JSON (issue 5).

The property, for every input: the parser either accepts it, and then what it reports is
self-consistent (every tensor inside the file, the data region packed, shapes and ranks within the
base model and the limits) and the safetensors library (the engine loads adapters with it) reads the
same tensors; or it raises InvalidFinetune (3039) with a message that names the file, is bounded and
can be sent as UTF-8. Never another exception, never a hang, never an allocation the file does not
justify (a header claiming 2**60 bytes).

Deterministic (`derandomize`) and bounded for CI (~20 s on 2 cores). A longer run, with the same
example count for every property:

    LORASERVE_FUZZ_EXAMPLES=20000 scripts/test tests/registry/test_registry_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, deserialize

from loraserve.errors import InvalidFinetune
from loraserve.registry import synth
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.validate import (
    DTYPE_SIZES,
    MAX_ALPHA,
    MAX_CONFIG_BYTES,
    MAX_HEADER_BYTES,
    AdapterConfig,
    AdapterTensors,
    parse_adapter_config,
    validate_safetensors,
)
from loraserve.types import LORA_TARGETS

BASE = (
    synth.llama_model_info()
)  # 2 layers; q (16, 16), k/v (16, 8), o (16, 16), gate/up (16, 32), down (32, 16)
LIMITS = RegistryLimits(max_rank=8)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
SCALE = int(os.environ.get("LORASERVE_FUZZ_EXAMPLES", "0") or 0)
CALL_SECONDS = 5.0  # one parse of a few KB; far above the ~1 ms it takes, so only a hang trips it
MAX_MESSAGE = 2000
PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def fuzz(examples: int) -> settings:
    """`examples` in CI; LORASERVE_FUZZ_EXAMPLES overrides it for every property."""
    return settings(
        max_examples=SCALE or examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / WEIGHTS


# The oracles


def note(outcome: str) -> None:
    """Count outcomes for --hypothesis-show-statistics (which check refused how many examples)."""
    if currently_in_test_context():
        event(outcome)


def refused(exc: InvalidFinetune, file: str) -> str:
    assert (exc.code, exc.status) == (3039, 400)
    message = exc.message
    assert message.startswith(file) and len(message) > len(file) + 5, message
    assert len(message) <= MAX_MESSAGE, message[:200]
    message.encode("utf-8")  # the JSON envelope can carry it (no lone surrogate)
    # Which check refused it, for --hypothesis-show-statistics: the message without names and numbers.
    kind = re.sub(r"'[^']*'|\[.*?\]|\{.*\}|-?\d+(\.\d+)?", "_", message.removeprefix(file))
    note("refused: " + kind.strip(": ")[:60])
    return message


def _floats(dtype: str, data: bytes) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
    return np.frombuffer(data, "<f4" if dtype == "F32" else "<f2")


def consistent(blob: bytes, t: AdapterTensors) -> None:
    """What an accepted file must be, checked independently of the validator, and by the library."""
    n = int.from_bytes(blob[:8], "little")
    assert t.data_offset == 8 + n <= len(blob)
    position = 0
    for begin, end in sorted((x.begin, x.end) for x in t.tensors):
        assert begin == position < end
        position = end
    assert t.data_offset + position == len(blob)
    loaded = dict(deserialize(blob))  # raises if the engine could not load what was accepted
    assert set(loaded) == {x.name for x in t.tensors}
    for x in t.tensors:
        got = loaded[x.name]
        assert (got["dtype"], tuple(got["shape"])) == (x.dtype, x.shape)
        assert math.prod(x.shape) * DTYPE_SIZES[x.dtype] == x.end - x.begin
        data = bytes(got["data"])
        assert data == blob[t.data_offset + x.begin : t.data_offset + x.end]
        assert np.isfinite(_floats(x.dtype, data)).all()
    assert len({(m.layer, m.proj) for m in t.modules}) == len(t.modules) > 0
    for m in t.modules:
        in_f, out_f = BASE.lora_shapes[m.proj]
        assert 0 <= m.layer < BASE.num_layers and 1 <= m.rank <= LIMITS.max_rank
        assert (m.a.shape, m.b.shape) == ((m.rank, in_f), (out_f, m.rank))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in t.metadata.items())


def timed(call: Callable[[], Any]) -> Any:
    start = time.monotonic()
    try:
        return call()
    finally:
        assert time.monotonic() - start < CALL_SECONDS


def in_thread(call: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def check_file(path: Path, blob: bytes, config: AdapterConfig | None = None) -> AdapterTensors | str:
    """Accepted tensors, or the refusal's message."""
    path.write_bytes(blob)
    try:
        tensors: AdapterTensors = timed(lambda: validate_safetensors(path, BASE, config, LIMITS))
    except InvalidFinetune as exc:
        return refused(exc, WEIGHTS)
    consistent(blob, tensors)
    note("accepted")
    return tensors


def check_config(data: bytes) -> AdapterConfig | str:
    try:
        config: AdapterConfig = timed(lambda: parse_adapter_config(data, BASE, LIMITS))
    except InvalidFinetune as exc:
        return refused(exc, CONFIG)
    assert isinstance(config.r, int) and 1 <= config.r <= LIMITS.max_rank
    assert isinstance(config.lora_alpha, float) and 0 < config.lora_alpha <= MAX_ALPHA
    assert config.target_modules and all(
        PLAIN_NAME.fullmatch(t) and t.rsplit(".", 1)[-1] in BASE.lora_shapes for t in config.target_modules
    )
    assert all(isinstance(v, int) and 1 <= v <= LIMITS.max_rank for v in config.rank_pattern.values())
    assert all(isinstance(v, float) and 0 < v <= MAX_ALPHA for v in config.alpha_pattern.values())
    assert all(PLAIN_NAME.fullmatch(k) for k in [*config.rank_pattern, *config.alpha_pattern])
    layers = config.layers_to_transform
    assert layers is None or (
        list(layers) == sorted(set(layers)) and 0 <= layers[0] <= layers[-1] < BASE.num_layers
    )
    assert config.model_type == BASE.architecture
    assert 1 <= config.max_rank <= LIMITS.max_rank
    for layer in range(BASE.num_layers):
        for proj in BASE.lora_shapes:
            config.targets(layer, proj)
            assert 1 <= config.rank_for(layer, proj) <= LIMITS.max_rank
            assert math.isfinite(config.alpha_for(layer, proj) / config.rank_for(layer, proj))
    # The engine reads the same bytes with plain json.loads: it must see the same numbers.
    raw = json.loads(data.decode("utf-8"))
    assert float(raw["lora_alpha"]) == config.lora_alpha and raw["r"] == config.r
    note("accepted")
    return config


# JSON with what json.dumps will not write: NaN literals, "-0", duplicate keys, lone surrogates, 5000 digits


@dataclass(frozen=True)
class Raw:
    """JSON text emitted verbatim."""

    text: str

    def __repr__(self) -> str:  # 4400 digits would flood hypothesis' reports
        return f"Raw({self.text[:20]!r}{'...' if len(self.text) > 20 else ''})"


@dataclass(frozen=True)
class Obj:
    """A JSON object as a list of pairs, so that a key can appear twice."""

    pairs: tuple[tuple[str, object], ...]


def encode(value: object) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj | dict):
        pairs = value.pairs if isinstance(value, Obj) else tuple(value.items())
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in pairs) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)  # a str with a lone surrogate comes out as a "\ud800" escape


def as_obj(mapping: Mapping[str, object]) -> Obj:
    return Obj(tuple((k, as_obj(v) if isinstance(v, dict) else v) for k, v in mapping.items()))


ODD_NUMBERS = [
    "-0",
    "-0.0",
    "0.0",
    "1e2",
    "1E400",
    "-1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "1" + "0" * 400,
    "1" + "0" * 4299,
    "1" + "0" * 4400,
    "-" + "9" * 30,
    "18446744073709551616",
]
ODD_STRINGS = ["\ud800", "a\udfff", "\ufeff", "\x00", "é", "😀", "\u202e", "A" * 300, ""]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(ODD_STRINGS)
    | st.sampled_from([Raw(n) for n in ODD_NUMBERS])
)
_containers: list[Callable[[st.SearchStrategy[object]], st.SearchStrategy[object]]] = [
    lambda inner: st.lists(inner, max_size=4),
    lambda inner: st.dictionaries(st.text(max_size=6), inner, max_size=4).map(as_obj),
    lambda inner: st.dictionaries(
        st.sampled_from(["dtype", "shape", "data_offsets", "r"]), inner, max_size=4
    ).map(as_obj),
    # pairs, so that a key is now and then repeated
    lambda inner: st.lists(st.tuples(st.sampled_from(["a", "b", "dtype", "shape"]), inner), max_size=3).map(
        lambda p: Obj(tuple(p))
    ),
]
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(*(make(inner) for make in (*_containers[:3], *_containers))),
    max_leaves=10,
)
big_ints = st.sampled_from(
    [2**31, 2**32, 2**53 + 1, 2**63, 2**64, 2**64 + 16, 10**30, 10**400, -(2**63), -(10**400)]
)


# Valid adapters, and their mutations


@st.composite
def adapters(draw: st.DrawFn) -> bytes:
    """A valid adapter file for BASE: some projections of some layers, one dtype, PEFT's naming."""
    targets = draw(st.lists(st.sampled_from(LORA_TARGETS), min_size=1, max_size=3, unique=True))
    layers = draw(st.lists(st.integers(0, BASE.num_layers - 1), min_size=1, max_size=2, unique=True))
    r = draw(st.integers(1, LIMITS.max_rank))
    arrays = synth.lora_tensors(BASE, r, targets=targets, layers=layers, seed=draw(st.integers(0, 3)))
    dtype = draw(st.sampled_from(["F32", "F16", "BF16"]))
    prefix = draw(st.sampled_from(["base_model.model.", ""]))
    default = draw(st.booleans())
    tensors: dict[str, np.ndarray | synth.RawTensor] = {}
    for name, array in draw(st.permutations(list(arrays.items()))):
        name = name.removeprefix("base_model.model.")
        name = prefix + (name.replace(".weight", ".default.weight") if default else name)
        tensors[name] = (
            synth.bf16(array)
            if dtype == "BF16"
            else array.astype(np.float16 if dtype == "F16" else np.float32)
        )
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    return synth.encode_safetensors(tensors, metadata)


def split(blob: bytes) -> tuple[Obj, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return as_obj(json.loads(blob[8 : 8 + n])), blob[8 + n :]


def pack(header: object, data: bytes, pad: bool = True) -> bytes:
    text = encode(header).encode("utf-8", "surrogatepass")
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def near_names(name: str) -> st.SearchStrategy[str]:
    """Names a hostile or sloppy writer might use instead of a good one."""
    return st.sampled_from(
        [
            name.replace("layers.0.", "layers.00.").replace("layers.1.", "layers.01."),
            name.replace("layers.0.", "layers.-1.").replace("layers.1.", "layers.999999."),
            name.replace("layers.0.", f"layers.{2**70}.").replace("layers.1.", "layers.2."),
            name.replace("lora_A", "lora_C").replace("lora_B", "lora_A"),
            name.replace("self_attn", "mlp").replace("mlp.", "self_attn."),
            name.replace("_proj", "_proj2"),
            name.upper(),
            name + " ",
            " " + name,
            name.replace(".weight", ".bias"),
            name.replace("base_model.model.", "base_model.model.base_model.model."),
            name.replace(".", "\u2024"),
            name + "\ud800",
            name.replace("lora_A", "lora_magnitude_vector"),
            "base_model.model.lm_head.weight",
            "__metadata__",
            "",
        ]
    ) | st.text(max_size=80)


@st.composite
def header_mutations(draw: st.DrawFn) -> bytes:
    """A valid file whose header had one to three fields, entries or keys corrupted."""
    header, data = split(draw(adapters()))
    pairs = list(header.pairs)
    for _ in range(draw(st.integers(1, 3))):
        if not pairs:
            pairs.append((draw(st.text(max_size=8)), draw(json_values)))
            continue
        names = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"] or [0]
        i = draw(st.sampled_from(names))
        op = draw(
            st.sampled_from(
                [
                    "dtype",
                    "shape",
                    "offsets",
                    "field",
                    "drop-field",
                    "entry",
                    "drop",
                    "dup",
                    "dup-field",
                    "rename",
                    "add",
                    "metadata",
                    "swap",
                ]
            )
        )
        name, entry = pairs[i]
        fields = dict(entry.pairs) if isinstance(entry, Obj) else {}
        if op == "dtype":
            fields["dtype"] = draw(
                st.sampled_from(
                    ["F64", "I8", "U8", "I32", "BOOL", "F8_E4M3", "F8_E5M2", "f32", "F32 ", "", "BF16\x00"]
                )
                | json_values
            )
        elif op == "shape":
            old_shape = fields.get("shape")
            shape = list(old_shape) if isinstance(old_shape, list) else [1]
            fields["shape"] = draw(
                st.lists(
                    st.integers(-3, 40) | big_ints | st.sampled_from([Raw("-0"), Raw("1e1"), 2.0]),
                    max_size=10,
                )
                | st.just(shape[::-1])
                | st.just([*shape, 1])
                | st.just([0, *shape])
                | json_values
            )
        elif op == "offsets":
            offsets = fields.get("data_offsets")
            ok = isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
            begin, end = offsets if ok else [0, 0]  # type: ignore[misc]
            k = draw(st.integers(-70, 70))
            fields["data_offsets"] = draw(
                st.sampled_from(
                    [
                        [end, begin],
                        [begin + k, end + k],
                        [begin, end + k],
                        [begin + k, end],
                        [begin],
                        [begin, end, end],
                        [begin, Raw("NaN")],
                        [Raw("-0"), end],
                        [float(begin), end],
                    ]
                )
                | st.lists(st.integers(-1, 300) | big_ints, max_size=3)
                | json_values
            )
        elif op == "field":
            fields[draw(st.text(max_size=8))] = draw(json_values)
        elif op == "drop-field" and fields:
            del fields[draw(st.sampled_from(sorted(fields)))]
        elif op == "entry":
            pairs[i] = (name, draw(json_values))
            continue
        elif op == "drop":
            del pairs[i]
            continue
        elif op == "dup":
            pairs.insert(draw(st.integers(0, len(pairs))), (name, entry))
            continue
        elif op == "dup-field" and isinstance(entry, Obj) and entry.pairs:
            key, value = draw(st.sampled_from(entry.pairs))
            pairs[i] = (name, Obj((*entry.pairs, (key, draw(st.just(value) | json_values)))))
            continue
        elif op == "rename":
            pairs[i] = (draw(near_names(name)), entry)
            continue
        elif op == "add":
            new_entry = draw(st.just(entry) | json_values)
            pairs.insert(draw(st.integers(0, len(pairs))), (draw(near_names(name)), new_entry))
            continue
        elif op == "metadata":
            meta = draw(
                json_values
                | st.dictionaries(
                    st.text(max_size=6) | st.sampled_from(ODD_STRINGS),
                    st.text(max_size=6) | scalars,
                    max_size=4,
                ).map(as_obj)
                | st.just(Obj((("format", "pt"), ("format", "np"))))
            )
            at = next((j for j, (k, _) in enumerate(pairs) if k == "__metadata__"), None)
            if at is None or draw(st.booleans()):
                pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", meta))
            else:
                pairs[at] = ("__metadata__", meta)
            continue
        elif op == "swap":
            j = draw(st.sampled_from(names))
            other = pairs[j][1]
            if isinstance(other, Obj) and "data_offsets" in dict(other.pairs):
                fields["data_offsets"] = dict(other.pairs)["data_offsets"]
        pairs[i] = (name, Obj(tuple(fields.items())))
    text_header: object = Obj(tuple(pairs))
    framing = draw(
        st.sampled_from(["plain"] * 10 + ["unpadded", "lead-space", "bom", "nul-pad", "trailing-junk"])
    )
    if framing == "lead-space":
        text_header = Raw(" \n\t" + encode(text_header))
    elif framing == "bom":
        text_header = Raw("\ufeff" + encode(text_header))
    elif framing == "nul-pad":
        text_header = Raw(encode(text_header) + "\x00\x00")
    elif framing == "trailing-junk":
        text_header = Raw(encode(text_header) + draw(st.sampled_from(["]", "}", ",", "x", "{}", " 1"])))
    return pack(text_header, data, pad=framing != "unpadded")


# adapter_model.safetensors


@fuzz(150)
@given(blob=adapters())
def test_valid_adapters_are_accepted(scratch: Path, blob: bytes) -> None:
    result = check_file(scratch, blob)
    assert isinstance(result, AdapterTensors), result


@fuzz(500)
@given(blob=st.binary(max_size=512) | st.binary(min_size=8, max_size=64).map(lambda b: b + bytes(1024)))
def test_arbitrary_bytes(scratch: Path, blob: bytes) -> None:
    check_file(scratch, blob)


@fuzz(300)
@given(header=st.binary(max_size=512), data=st.binary(max_size=256))
def test_arbitrary_header_bytes_with_a_true_length(scratch: Path, header: bytes, data: bytes) -> None:
    check_file(scratch, struct.pack("<Q", len(header)) + header + data)


@fuzz(500)
@given(header=json_values, data=st.binary(max_size=128))
def test_arbitrary_json_headers(scratch: Path, header: object, data: bytes) -> None:
    check_file(scratch, pack(header, data))


@fuzz(1200)
@given(blob=header_mutations())
def test_header_mutations(scratch: Path, blob: bytes) -> None:
    check_file(scratch, blob)


@fuzz(600)
@given(blob=adapters(), data=st.data())
def test_byte_mutations(scratch: Path, blob: bytes, data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "prefix", "splice"]))
    n = int.from_bytes(blob[:8], "little")
    if op == "flip":
        mutated = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            mutated[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        check_file(scratch, bytes(mutated))
    elif op == "truncate":  # every truncation loses a tensor's bytes or breaks the header: refused
        assert isinstance(check_file(scratch, blob[: data.draw(st.integers(0, len(blob) - 1))]), str)
    elif op == "extend":  # the header no longer describes the whole file: refused
        assert isinstance(check_file(scratch, blob + data.draw(st.binary(min_size=1, max_size=64))), str)
    elif op == "prefix":
        claim = data.draw(
            st.integers(0, 2**64 - 1)
            | st.integers(max(0, n - 16), n + 16)
            | st.sampled_from([2**60, 2**63, len(blob)])
        )
        assume(claim != n)
        message = check_file(scratch, struct.pack("<Q", claim) + blob[8:])
        if claim < n or claim > len(blob) - 8:
            assert isinstance(message, str)
    else:
        at = data.draw(st.integers(0, len(blob)))
        cut = data.draw(st.integers(0, 16))
        check_file(scratch, blob[:at] + data.draw(st.binary(max_size=16)) + blob[at + cut :])


@fuzz(150)
@given(blob=adapters(), data=st.data())
def test_a_nonfinite_value_anywhere_is_found(scratch: Path, blob: bytes, data: st.DataObject) -> None:
    header, _ = split(blob)
    entries = [(k, dict(v.pairs)) for k, v in header.pairs if k != "__metadata__" and isinstance(v, Obj)]
    name, entry = data.draw(st.sampled_from(entries))
    dtype, (begin, end) = entry["dtype"], entry["data_offsets"]
    size = DTYPE_SIZES[str(dtype)]
    index = data.draw(st.integers(0, (int(end) - int(begin)) // size - 1))
    bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    word = {
        "F32": struct.pack("<f", bad),
        "F16": np.array([bad], np.float16).tobytes(),
        "BF16": struct.pack("<f", bad)[2:],
    }[str(dtype)]
    at = 8 + int.from_bytes(blob[:8], "little") + int(begin) + index * size
    message = check_file(scratch, blob[:at] + word + blob[at + size :])
    assert isinstance(message, str) and f"{name!r}" in message and f"at element {index}" in message, message


@fuzz(200)
@given(blob=adapters(), claim=st.integers(0, 2**64 - 1))
def test_the_claimed_header_length_is_not_allocated(scratch: Path, blob: bytes, claim: int) -> None:
    """Memory follows the file, never the length prefix (which is all a hostile file controls)."""
    scratch.write_bytes(struct.pack("<Q", claim) + blob[8:])
    tracemalloc.start()
    try:
        validate_safetensors(scratch, BASE, None, LIMITS)
    except InvalidFinetune:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 256 * 1024 + 64 * len(blob), peak


@pytest.mark.parametrize("claim", [2**60, 2**63, 2**64 - 1, MAX_HEADER_BYTES + 1])
def test_a_huge_claimed_header_is_refused_before_reading(scratch: Path, claim: int) -> None:
    blob = synth.encode_safetensors(synth.lora_tensors(BASE, 4))
    scratch.write_bytes(struct.pack("<Q", claim) + blob[8:])
    tracemalloc.start()
    with pytest.raises(InvalidFinetune, match=r"header length .* exceeds the limit"):
        validate_safetensors(scratch, BASE, None, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024


def test_a_hostile_header_costs_memory_in_proportion(scratch: Path) -> None:
    """The worst case for json.loads (a Python object per 3 bytes) stays linear, and the cap bounds it."""
    body = b'{"a":[' + b"{}," * (1 << 18) + b"0]}"
    scratch.write_bytes(struct.pack("<Q", len(body)) + body)
    tracemalloc.start()
    with pytest.raises(InvalidFinetune, match="header entry must be an object"):
        validate_safetensors(scratch, BASE, None, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 * len(body), peak


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '{"x":{"dtype":"F32","shape":' + "[" * 20_000 + "]" * 20_000 + ',"data_offsets":[0,0]}}',
    ],
)
def test_deeply_nested_headers(scratch: Path, text: str) -> None:
    assert isinstance(check_file(scratch, pack(Raw(text), b"")), str)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["entry", "shape", "dtype", "metadata", "field"])
def test_nesting_near_the_recursion_limit_in_every_place(scratch: Path, where: str) -> None:
    """json.loads may accept a depth that a later repr() of the value (for the message) cannot print."""
    name = synth.lora_name(0, "q_proj", "A")
    for depth in range(900, 1010, 3):
        value = Raw(nested(depth))
        entry: dict[str, object] = {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]}
        if where in ("shape", "dtype"):
            entry[where] = value
        header: dict[str, object] = {name: value if where == "entry" else entry}
        if where == "metadata":
            header["__metadata__"] = {"k": value}
        elif where == "field":
            entry["extra"] = value
        blob = pack(header, bytes(64))
        check_file(scratch, blob)
        if depth % 30 == 0:  # and in a thread, as the server runs uploads, with a smaller stack
            in_thread(lambda b=blob: check_file(scratch, b))


def test_library_disagreements_are_refused(scratch: Path) -> None:
    """Files json.loads would take but the safetensors library (and so the engine) refuses."""
    a, b = synth.lora_name(0, "q_proj", "A"), synth.lora_name(0, "q_proj", "B")
    ea = {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]}
    eb = {"dtype": "F32", "shape": [16, 1], "data_offsets": [64, 128]}
    cases = {
        "trailing bytes": (pack({a: ea, b: eb}, bytes(130)), "2 bytes after the last tensor"),
        "a gap": (
            pack({a: ea, b: {**eb, "data_offsets": [68, 132]}}, bytes(132)),
            "leaves bytes 64..68 unused",
        ),
        "duplicate field": (
            pack({a: Obj((*as_obj(ea).pairs, ("dtype", "F16"))), b: eb}, bytes(128)),
            "twice",
        ),
        "NaN literal": (pack({a: {**ea, "x": Raw("NaN")}, b: eb}, bytes(128)), "NaN is not a JSON number"),
        "minus zero": (
            pack({a: {**ea, "data_offsets": [Raw("-0"), 64]}, b: eb}, bytes(128)),
            "data_offsets must be",
        ),
        "lone surrogate": (pack({"__metadata__": {"k": "\ud800"}, a: ea, b: eb}, bytes(128)), "__metadata__"),
    }
    for case, (blob, match) in cases.items():
        message = check_file(scratch, blob)
        assert isinstance(message, str) and match in message, (case, message)
        with pytest.raises(SafetensorError):
            deserialize(blob)


def test_unknown_fields_and_repeated_tensors_are_refused(scratch: Path) -> None:
    """The library skips unknown fields, but parses them by its own stricter rules (depth 128, no NaN),
    and keeps the last of two equal tensor names, as json.loads does: both are refused, naming them."""
    a, b = synth.lora_name(0, "q_proj", "A"), synth.lora_name(0, "q_proj", "B")
    ea = {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]}
    eb = {"dtype": "F32", "shape": [16, 1], "data_offsets": [64, 128]}
    message = check_file(scratch, pack({a: {**ea, "x": [[[]]]}, b: eb}, bytes(128)))
    assert isinstance(message, str) and "unexpected field 'x'" in message and a in message
    message = check_file(scratch, pack(Obj(((a, ea), (b, eb), (a, ea))), bytes(128)))
    assert isinstance(message, str) and f"the key {a!r} twice" in message


@pytest.mark.parametrize("big", [10**40, 10**400, 10**4000], ids=["1e40", "1e400", "1e4000"])
def test_huge_shapes_and_offsets(scratch: Path, big: int) -> None:
    a = synth.lora_name(0, "q_proj", "A")
    for entry in (
        {"dtype": "F32", "shape": [big, big], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [0, big], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [1, 16], "data_offsets": [big, big + 64]},
        {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, big]},
    ):
        assert isinstance(check_file(scratch, pack({a: entry}, bytes(64))), str)


# adapter_config.json


GOOD_CONFIG: dict[str, object] = json.loads(
    synth.adapter_config(4, 8, ("q_proj", "v_proj"), model_type="llama", layers_to_transform=[0, 1])
)
FIELDS = list(dict.fromkeys([*GOOD_CONFIG, "use_dora", "lora_bias", "layers_pattern", "target_parameters"]))
REGEXES = [
    ".*",
    "q_proj|v_proj",
    "(a+)+$",
    r".*\.q_proj",
    ".*(q|v)_proj$",
    "^q_proj$",
    "q_proj ",
    " q_proj",
    "all-linear",
    "ALL-LINEAR",
    "all_linear",
    "model.layers.0.self_attn.q_proj",
    "layers.99.q_proj",
    "self_attn.q_proj",
    "q_proj.",
    ".q_proj",
    "q_proj..v_proj",
    "lm_head",
    "embed_tokens",
    "q_proj\ud800",
]
module_names = st.sampled_from(REGEXES) | st.sampled_from(list(BASE.lora_shapes)) | st.text(max_size=20)


def field_values(key: str) -> st.SearchStrategy[object]:
    targeted: dict[str, st.SearchStrategy[object]] = {
        "r": st.integers(-2, 12) | big_ints | st.sampled_from([4.0, True, "4", Raw("NaN"), Raw("-0")]),
        "lora_alpha": st.floats()
        | st.integers()
        | big_ints
        | st.sampled_from([Raw("Infinity"), Raw("1e400"), "8"]),
        "target_modules": module_names | st.lists(module_names | scalars, max_size=6),
        "rank_pattern": st.dictionaries(module_names, st.integers(-1, 10) | scalars, max_size=4).map(as_obj),
        "alpha_pattern": st.dictionaries(module_names, st.floats() | scalars, max_size=4).map(as_obj),
        "layers_to_transform": st.lists(st.integers(-2, 3) | big_ints | scalars, max_size=4) | scalars,
        "model_type": st.sampled_from(["llama", "LLAMA", "Llama", "mistral", "gemma", "llama\ud800"])
        | scalars,
        "peft_type": st.sampled_from(["LORA", "lora", "IA3", "LOHA"]) | scalars,
    }
    return targeted.get(key, st.nothing()) | json_values


@st.composite
def config_mutations(draw: st.DrawFn) -> bytes:
    pairs = list(as_obj(GOOD_CONFIG).pairs)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "drop", "dup"]))
        key = draw(st.sampled_from(FIELDS) | st.text(max_size=8))
        if op == "set":
            pairs = [(k, v) for k, v in pairs if k != key] + [(key, draw(field_values(key)))]
        elif op == "drop":
            pairs = [(k, v) for k, v in pairs if k != key]
        else:
            pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(field_values(key))))
    text = encode(Obj(tuple(pairs))).encode("utf-8", "surrogatepass")
    framing = draw(st.sampled_from(["plain"] * 6 + ["bom", "latin-1", "truncated", "nul", "utf-16", "junk"]))
    if framing == "bom":
        text = b"\xef\xbb\xbf" + text
    elif framing == "latin-1":
        text = text.replace(b'"llama"', b'"ll\xe0ma"').replace(b'"none"', b'"n\xf6ne"') + b" \xff"
    elif framing == "truncated":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif framing == "nul":
        text = text + b"\x00"
    elif framing == "utf-16":
        text = text.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    elif framing == "junk":
        text = text + draw(st.binary(min_size=1, max_size=8))
    return text


def test_the_good_config_is_accepted() -> None:
    assert isinstance(check_config(json.dumps(GOOD_CONFIG).encode()), AdapterConfig)


@fuzz(500)
@given(data=st.binary(max_size=512))
def test_config_arbitrary_bytes(data: bytes) -> None:
    check_config(data)


@fuzz(300)
@given(value=json_values)
def test_config_arbitrary_json(value: object) -> None:
    check_config(encode(value).encode("utf-8", "surrogatepass"))


@fuzz(1200)
@given(data=config_mutations())
def test_config_mutations(data: bytes) -> None:
    check_config(data)


def _config_with(key: str, raw: str) -> bytes:
    pairs = [(k, v) for k, v in as_obj(GOOD_CONFIG).pairs if k != key] + [(key, Raw(raw))]
    return encode(Obj(tuple(pairs))).encode()


@pytest.mark.parametrize("key", FIELDS)
def test_config_hostile_values_in_every_field(key: str) -> None:
    """Every field gets deep nesting, huge numbers, NaN literals, giant strings and each wrong type."""
    hostile = [
        nested(100_000),
        "[" * 100_000,
        *(nested(d) for d in range(900, 1010, 7)),
        *ODD_NUMBERS,
        json.dumps("x" * 500_000),
        json.dumps("q_proj." * 60_000 + "q_proj"),
        json.dumps(["q_proj"] * 60_000),
        json.dumps([f"a{i}.q_proj" for i in range(20_000)]),
        json.dumps({f"a{i}.q_proj": 2 for i in range(20_000)}),
        json.dumps(list(range(50_000))),
        "true",
        "false",
        "null",
        "[]",
        "{}",
        '""',
        '"\\ud800"',
        "[null]",
        '{"a": {"b": []}}',
    ]
    for raw in hostile:
        data = _config_with(key, raw)
        if len(data) <= MAX_CONFIG_BYTES:
            check_config(data)
    for depth in (900, 930, 960, 990):
        in_thread(lambda d=depth: check_config(_config_with(key, nested(d))))


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf" + json.dumps(GOOD_CONFIG).encode(),
        json.dumps(GOOD_CONFIG).encode("utf-16"),
        json.dumps(GOOD_CONFIG).encode()[:-1] + b"\xff}",
        b'{"r": 4, "r": 99999, "lora_alpha": 8, "target_modules": ["q_proj"]}',
        b'{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_modules": ".*"}',
        b" " * (MAX_CONFIG_BYTES + 1),
        b"[" * MAX_CONFIG_BYTES,
        b'{"a": "' + b"\\ud800" * 100_000 + b'"}',
        b"1" * 5000,
        b"",
    ],
    ids=[
        "bom",
        "utf-16",
        "non-utf8",
        "dup-r",
        "dup-targets",
        "too-big",
        "deep-1MB",
        "surrogates",
        "5000-digits",
        "empty",
    ],
)
def test_config_hostile_files(data: bytes) -> None:
    check_config(data)


def test_duplicate_keys_in_a_config_mean_what_the_engine_reads() -> None:
    """json.loads keeps the last of two equal keys, in the registry and in the engine alike."""
    result = check_config(b'{"r": 99, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    assert isinstance(result, AdapterConfig) and result.r == 4


# The two files together


@st.composite
def pairs_of_files(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """A valid config and a valid weights file, and whether PEFT would call them one adapter."""
    projs = list(LORA_TARGETS)
    c_targets = draw(st.lists(st.sampled_from(projs), min_size=1, max_size=3, unique=True))
    c_r = draw(st.integers(1, 4))
    c_ranks = draw(st.dictionaries(st.sampled_from(projs), st.integers(1, 4), max_size=2))
    c_layers = draw(
        st.none() | st.lists(st.integers(0, BASE.num_layers - 1), min_size=1, max_size=2, unique=True)
    )
    w_targets = draw(
        st.sampled_from([c_targets]) | st.lists(st.sampled_from(projs), min_size=1, max_size=3, unique=True)
    )
    w_layers = draw(
        st.sampled_from([c_layers or list(range(BASE.num_layers))])
        | st.lists(st.integers(0, BASE.num_layers - 1), min_size=1, max_size=2, unique=True)
    )
    w_ranks = {p: draw(st.sampled_from([c_ranks.get(p, c_r)]) | st.integers(1, 4)) for p in w_targets}
    config = synth.adapter_config(c_r, 2 * c_r, c_targets, rank_pattern=c_ranks, layers_to_transform=c_layers)
    weights = synth.encode_safetensors(
        synth.lora_tensors(BASE, 1, targets=w_targets, layers=w_layers, ranks=w_ranks)
    )
    targeted = {(layer, p) for p in c_targets for layer in (c_layers or range(BASE.num_layers))}
    modules = {(layer, p) for p in w_targets for layer in w_layers}
    match = (
        modules <= targeted
        and all(w_ranks[p] == c_ranks.get(p, c_r) for p in w_targets)
        and {p for _, p in modules} >= set(c_targets)
    )
    return config, weights, match


@fuzz(300)
@given(files=pairs_of_files())
def test_config_and_weights_cross_check(scratch: Path, files: tuple[bytes, bytes, bool]) -> None:
    config_bytes, weights, match = files
    config = check_config(config_bytes)
    assert isinstance(config, AdapterConfig)
    result = check_file(scratch, weights, config)
    assert isinstance(result, AdapterTensors) == match, result
    if not match:
        assert isinstance(result, str) and "does not match adapter_config.json" in result

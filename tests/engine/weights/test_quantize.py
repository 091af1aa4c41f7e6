"""The quantizer (weights/quantize.py): ggml's reference bytes, read chunk by chunk from any float dtype; and
`--quantize` at load on a Hugging Face directory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from loraserve.engine.config import EngineConfig, Quantization
from loraserve.engine.kernels.qlinear import QuantLinearKernel, load_qlinear
from loraserve.engine.loader import load_engine
from loraserve.engine.ops.quant_linear import QuantLinear
from loraserve.engine.sources import embedded_gguf_path
from loraserve.engine.weights.hf import hf_tensors
from loraserve.engine.weights.quant import QuantTensor, QuantType
from loraserve.engine.weights.quantize import MADE, load_hf_quantized, quant_type, quantize

from quantize_helpers import tiny_hf_dir, write_byte_level_tokenizer

F = np.float32
MADE_32 = [q for q in MADE if q.block_elems == 32]  # gguf-py's; Q4_K is the kernel library's


def reference(w: torch.Tensor, qtype: QuantType) -> np.ndarray:
    """gguf-py's numpy quantizer on the whole matrix at once (Q4_K: the C quantizer in one call)."""
    if qtype is QuantType.Q4_K:
        kernel = load_qlinear()
        assert kernel is not None
        return kernel.quantize_q4_k(w.float().contiguous()).numpy()
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType(qtype.value))


def _fp16(value: np.float32) -> list[int]:
    return list(np.float16(value).tobytes())  # round to nearest even, as F16C's conversion


def ggml_block(x: np.ndarray, qtype: QuantType) -> list[int]:
    """One block as ggml-quants.c's quantize_row_{q8_0,q4_0,q4_1}_ref writes it, statement by statement in
    float32 (roundf: halves away from zero; (int8_t) casts truncate)."""
    if qtype is QuantType.Q8_0:
        amax = F(0)
        for v in x:
            amax = max(amax, abs(v))
        d = F(amax / F(127))
        inv = F(F(1) / d) if d else F(0)
        return _fp16(d) + [int(math.copysign(math.floor(abs(float(F(v * inv))) + 0.5), v)) & 0xFF for v in x]
    if qtype is QuantType.Q4_0:
        amax, top = F(0), F(0)
        for v in x:
            if amax < abs(v):
                amax, top = abs(v), v
        d = F(top / F(-8))
        inv = F(F(1) / d) if d else F(0)
        q = [min(15, int(F(F(v * inv) + F(8.5)))) for v in x]
        return _fp16(d) + [q[j] | q[j + 16] << 4 for j in range(16)]
    low, high = F(np.finfo(F).max), F(-np.finfo(F).max)
    for v in x:
        low, high = min(low, v), max(high, v)
    d = F(F(high - low) / F(15))
    inv = F(F(1) / d) if d else F(0)
    q = [min(15, int(F(F(F(v - low) * inv) + F(0.5)))) for v in x]
    return _fp16(d) + _fp16(low) + [q[j] | q[j + 16] << 4 for j in range(16)]


def _nearest(v: np.float32) -> int:
    """ggml's nearest_int: 1.5 * 2^23 added in float32, the integer read from the low bits (ties to even)."""
    return int(F(F(v) + F(12582912.0))) - 12582912


def _fit(x: np.ndarray, w: np.ndarray) -> tuple[np.float32, np.float32, list[int]]:
    """ggml-quants.c's make_qkx2_quants(32, 15, x, w, L, &the_min, Laux, -1, 0.1, 20, false), statement
    by statement in float32: (scale, the_min, L)."""
    lo, hi, sum_w, sum_x = x[0], x[0], w[0], F(w[0] * x[0])
    for i in range(1, 32):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    lo = min(lo, F(0))
    if hi == lo:
        return F(0), F(-lo), [0] * 32
    iscale = F(F(15) / F(hi - lo))
    scale = F(F(1) / iscale)
    levels = [max(0, min(15, _nearest(F(iscale * F(v - lo))))) for v in x]
    best = F(0)
    for i in range(32):
        diff = F(F(F(scale * F(levels[i])) + lo) - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    for step in range(21):
        iscale = F(F(F(F(-1) + F(F(0.1) * F(step))) + F(15)) / F(hi - lo))
        aux = [max(0, min(15, _nearest(F(iscale * F(v - lo))))) for v in x]
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(32):
            wl = F(w[i] * F(aux[i]))
            sum_l = F(sum_l + wl)
            sum_l2 = F(sum_l2 + F(wl * F(aux[i])))
            sum_xl = F(sum_xl + F(wl * x[i]))
        big_d = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if big_d > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / big_d)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / big_d)
            if this_min > 0:
                this_min, this_scale = F(0), F(sum_xl / sum_l2)
            err = F(0)
            for i in range(32):
                diff = F(F(F(this_scale * F(aux[i])) + this_min) - x[i])
                err = F(err + F(w[i] * F(diff * diff)))
            if err < best:
                levels, best, scale, lo = aux, err, this_scale, this_min
    return scale, F(-lo), levels


def ggml_q4_k_block(x: np.ndarray) -> list[int]:
    """One super-block of 256 as ggml-quants.c's quantize_row_q4_K_ref writes it, in float32."""
    scales, mins, levels = [], [], []
    for j in range(8):
        piece = x[32 * j:32 * j + 32]
        sum_x2 = F(0)
        for v in piece:
            sum_x2 = F(sum_x2 + F(v * v))
        av = F(np.sqrt(F(sum_x2 / F(32))))
        scale, the_min, piece_levels = _fit(piece, np.array([F(av + abs(v)) for v in piece], dtype=F))
        scales.append(scale)
        mins.append(the_min)
        levels += piece_levels
    max_scale, max_min = max([F(0), *scales]), max([F(0), *mins])
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    packed = [0] * 12
    for j in range(8):
        ls, lm = min(63, _nearest(F(inv_scale * scales[j]))), min(63, _nearest(F(inv_min * mins[j])))
        if j < 4:
            packed[j], packed[j + 4] = ls, lm
        else:
            packed[j + 4] = (ls & 0xF) | (lm & 0xF) << 4
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d, dmin = np.float16(F(max_scale / F(63))), np.float16(F(max_min / F(63)))
    for j in range(8):
        sc = packed[j] & 63 if j < 4 else (packed[j + 4] & 0xF) | (packed[j - 4] >> 6) << 4
        m = packed[j + 4] & 63 if j < 4 else (packed[j + 4] >> 4) | (packed[j] >> 6) << 4
        dj = F(F(d) * F(sc))
        if not dj:
            continue
        dm = F(F(dmin) * F(m))
        for i in range(32):
            levels[32 * j + i] = max(0, min(15, _nearest(F(F(x[32 * j + i] + dm) / dj))))
    qs = [levels[64 * c + i] | levels[64 * c + 32 + i] << 4 for c in range(4) for i in range(32)]
    return list(d.tobytes()) + list(dmin.tobytes()) + packed + qs


def odd_k_inputs() -> dict[str, torch.Tensor]:
    """Rows of super-blocks (256 values) that reach the fit's branches: flat pieces, pinned offsets."""
    rng = np.random.default_rng(2)
    spreads = (1e-6, 1e-3, 0.02, 1.0, 300.0)  # 1e-6: subnormal half-precision scales
    cases: dict[str, Any] = {f"normal-{s:g}": rng.normal(0, s, (2, 256)) for s in spreads}
    cases |= {
        "zeros": np.zeros((1, 256)),
        "one-zero-piece": np.concatenate([np.zeros((2, 32)), rng.normal(0, 1, (2, 224))], axis=1),
        "constant-pieces": np.repeat(rng.normal(0, 1, (2, 8)), 32, axis=1),  # negative ones are flat
        "negative": -np.abs(rng.normal(0, 1, (2, 256))),
        "positive": np.abs(rng.normal(0, 1, (2, 256))),  # min > 0: the offset pinned at 0
        "integers": rng.integers(-20, 20, (2, 256)),
        "skewed": rng.lognormal(0, 1, (2, 512)) - 0.5,
        "three-blocks": rng.normal(0, 0.05, (1, 768)),  # an odd count: the last one fitted alone
    }
    return {name: torch.from_numpy(np.asarray(a, dtype=F)) for name, a in cases.items()}


def test_q4_k_blocks_are_ggml_reference_bytes() -> None:
    """csrc/quantize_k.h fits 16 pieces side by side in vector registers; each still takes ggml's scalar
    steps in their order."""
    for name, w in odd_k_inputs().items():
        got = quantize(w, QuantType.Q4_K)
        assert got.qtype is QuantType.Q4_K and got.shape == tuple(w.shape)
        expected = [b for block in w.numpy().reshape(-1, 256) for b in ggml_q4_k_block(block)]
        assert got.blocks.reshape(-1).tolist() == expected, name


def test_q4_k_same_bytes_from_every_build(kernel: QuantLinearKernel) -> None:
    """The scalar build converts to half precision in software, the others with F16C; tiny values reach
    subnormal and zero half-precision scales."""
    rng = np.random.default_rng(4)
    rows = [rng.normal(0, s, 512) for s in (1e-6, 1e-4, 0.02, 5.0)] + [np.full(512, 3e-7), np.zeros(512)]
    w = torch.from_numpy(np.asarray(rows, dtype=F))
    assert torch.equal(kernel.quantize_q4_k(w), quantize(w, QuantType.Q4_K).blocks)


def test_q4_k_beats_q4_0_at_the_same_size() -> None:
    """Its reason to exist: 4.5 bits a weight as Q4_0, a fitted scale and offset per 32."""
    w = torch.from_numpy(np.random.default_rng(3).normal(0, 0.02, (64, 1024)).astype(F))
    q4_k, q4_0 = quantize(w, QuantType.Q4_K), quantize(w, QuantType.Q4_0)
    assert q4_k.blocks.numel() == q4_0.blocks.numel()
    rmse = {q.qtype: float((q.dequantize() - w).pow(2).mean().sqrt()) for q in (q4_k, q4_0)}
    assert rmse[QuantType.Q4_K] < 0.9 * rmse[QuantType.Q4_0], rmse


def odd_inputs() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    cases: dict[str, Any] = {f"normal-{s:g}": rng.normal(0, s, (4, 128)) for s in (1e-4, 0.02, 1.0, 3e4)}
    cases |= {
        "zeros": np.zeros((3, 64)),
        "one-zero-block": np.concatenate([np.zeros((4, 32)), rng.normal(0, 1, (4, 32))], axis=1),
        "negative": -np.abs(rng.normal(0, 1, (4, 96))),
        "positive": np.abs(rng.normal(0, 1, (4, 96))),
        "huge": rng.normal(0, 1, (4, 64)) * 1e30,  # the fp16 scale overflows to inf
        "past-fp16": np.full((2, 64), 70000.0),
        "ties": np.tile([1.0, -1.0, 0.5, -0.5], (4, 16)),  # |max| ties: the first wins
        "eighths": (np.arange(-256, 256) / 8).reshape(8, 64),
        "halves": [[127.0, *(k + 0.5 for k in range(-16, 15))]],  # Q8_0's d is 1: roundf of k + .5
        "integers": rng.integers(-20, 20, (8, 64)),
        "constant": np.full((2, 64), -3.25),
    }
    # Blocks whose scale underflows to a subnormal are left out: 1/d overflows to inf there and the C
    # float-to-int cast of inf is undefined (their fp16 scale is 0 either way).
    return {name: torch.from_numpy(np.asarray(a, dtype=F)) for name, a in cases.items()}


@pytest.mark.parametrize("qtype", MADE_32, ids=lambda q: q.name)
def test_blocks_are_ggml_reference_bytes(qtype: QuantType) -> None:
    for name, w in odd_inputs().items():
        got = quantize(w, qtype)
        assert got.qtype is qtype and got.shape == tuple(w.shape)
        with np.errstate(all="ignore"):
            expected = [b for block in w.numpy().reshape(-1, 32) for b in ggml_block(block, qtype)]
        assert got.blocks.reshape(-1).tolist() == expected, name


@pytest.mark.parametrize("qtype", MADE, ids=lambda q: q.name)
def test_half_precision_input_and_rows_over_several_chunks(qtype: QuantType) -> None:
    """A bf16 / fp16 checkpoint is widened a chunk of rows at a time (4096 columns: 256 rows a chunk)."""
    rng = np.random.default_rng(1)
    w = torch.from_numpy(rng.normal(0, 0.02, (600, 4096)).astype(np.float32))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        half = w.to(dtype)
        assert np.array_equal(quantize(half, qtype).blocks.numpy(), reference(half, qtype)), dtype


def test_refuses_what_it_cannot_make() -> None:
    with pytest.raises(ValueError, match="Q6_K blocks are not made here"):
        quantize(torch.zeros(2, 256), QuantType.Q6_K)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.zeros(2, 576), QuantType.Q4_K)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(2, 48), QuantType.Q8_0)
    with pytest.raises(ValueError, match="only a float matrix"):
        quantize(torch.zeros(64), QuantType.Q8_0)
    with pytest.raises(ValueError, match="only a float matrix"):
        quantize(torch.zeros(2, 64, dtype=torch.int32), QuantType.Q8_0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_hf_dir(tmp_path_factory.mktemp("hf"))
    write_byte_level_tokenizer(root)
    return root


@pytest.mark.parametrize("quantization", list(Quantization), ids=lambda q: q.name)
def test_quantized_at_load_as_gguf_py_would(hf_dir: Path, quantization: Quantization) -> None:
    """Projections and embedding in the chosen type, the untied head Q8_0, norms float32."""
    qtype = quant_type(quantization)
    _, state = load_hf_quantized(hf_dir, torch.float32, qtype)
    _, stored = hf_tensors(hf_dir)
    assert set(state) == set(stored)
    for name, lazy in stored.items():
        weight, original = state[name], lazy.load()
        if original.dim() == 1:
            assert isinstance(weight, torch.Tensor) and torch.equal(weight, original.float()), name
            continue
        kind = QuantType.Q8_0 if name == "lm_head.weight" else qtype
        assert isinstance(weight, QuantTensor) and weight.qtype is kind, name
        assert np.array_equal(weight.blocks.numpy(), reference(original, kind)), name


@pytest.mark.skipif(load_qlinear() is None, reason="no C compiler: the quantized kernel cannot be built")
def test_engine_serves_the_blocks(hf_dir: Path) -> None:
    engine, tokenizer = load_engine(str(hf_dir), EngineConfig(dtype="gguf", quantize=Quantization.Q4_1,
                                                              threads=1, block_size=4))
    layer = engine.model.layers[0]
    for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
        assert isinstance(proj, QuantLinear)
    assert isinstance(engine.model.embed, QuantTensor) and engine.model.embed.qtype is QuantType.Q4_1
    assert tokenizer.encode("hello") == [256, 257, ord("o")]  # the directory's own tokenizer


def test_refused_where_it_cannot_run(hf_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs dtype gguf, not float32"):
        EngineConfig(dtype="float32", quantize=Quantization.Q8_0)
    with pytest.raises(ValueError, match="needs dtype gguf, not auto"):
        EngineConfig(quantize=Quantization.Q8_0)
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(dtype="gguf", device="cuda", quantize=Quantization.Q8_0)
    with pytest.raises(ValueError, match="quantize must be one of q8_0, q4_0, q4_1"):
        EngineConfig(dtype="gguf", quantize="q8_0")  # type: ignore[arg-type]
    gguf_config = EngineConfig(dtype="gguf", quantize=Quantization.Q4_0)
    with pytest.raises(ValueError, match=r"is a GGUF file: serve it with --dtype gguf .* or --dtype float32"):
        load_engine(str(embedded_gguf_path()), gguf_config)
    with pytest.raises(ValueError, match="is a random model"):
        load_engine("random:tiny", gguf_config)
    with pytest.raises(ValueError, match="a Hugging Face directory is quantized at load with --quantize"):
        load_engine(str(hf_dir), EngineConfig(dtype="gguf"))

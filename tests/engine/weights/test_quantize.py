"""The quantizer (weights/quantize.py): ggml's reference bytes, read chunk by chunk from any float dtype; the
type of each tensor (llama.cpp's choice, q4_k_m's mix); and `--quantize` at load on a Hugging Face
directory."""

from __future__ import annotations

import ctypes
import importlib.util
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from loraserve.engine.config import EngineConfig, ModelConfig, Quantization
from loraserve.engine.kernels.qlinear import QuantLinearKernel, load_qlinear
from loraserve.engine.loader import load_engine
from loraserve.engine.ops.quant_linear import QuantLinear
from loraserve.engine.sources import embedded_gguf_path
from loraserve.engine.weights.hf import hf_tensors
from loraserve.engine.weights.quant import QuantTensor, QuantType
from loraserve.engine.weights.quantize import MADE, load_hf_quantized, quant_type, quantize, target_type

from quantize_helpers import tiny_hf_dir, write_byte_level_tokenizer

F = np.float32
MADE_32 = [q for q in MADE if q.block_elems == 32]  # gguf-py's; the K-quants are the kernel library's


def reference(w: torch.Tensor, qtype: QuantType) -> np.ndarray:
    """gguf-py's numpy quantizer on the whole matrix at once (the K-quants: the C quantizer in one call)."""
    if qtype.block_elems == 256:
        kernel = load_qlinear()
        assert kernel is not None
        made = {QuantType.Q4_K: kernel.quantize_q4_k, QuantType.Q5_K: kernel.quantize_q5_k,
                QuantType.Q6_K: kernel.quantize_q6_k}[qtype]
        return made(w.float().contiguous()).numpy()
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


# make_qkx2_quants' nmax, rmin and nstep as quantize_row_q{4,5}_K_ref pass them (rdelta: 0.1 for both)
_K_FITS = {QuantType.Q4_K: (15, -1.0, 20), QuantType.Q5_K: (31, -0.5, 15)}


def _fit(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float,
         nstep: int) -> tuple[np.float32, np.float32, list[int]]:
    """ggml-quants.c's make_qkx2_quants(32, nmax, x, w, L, &the_min, Laux, rmin, 0.1, nstep, false),
    statement by statement in float32: (scale, the_min, L)."""
    lo, hi, sum_w, sum_x = x[0], x[0], w[0], F(w[0] * x[0])
    for i in range(1, 32):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w = F(sum_w + w[i])
        sum_x = F(sum_x + F(w[i] * x[i]))
    lo = min(lo, F(0))
    if hi == lo:
        return F(0), F(-lo), [0] * 32
    iscale = F(F(nmax) / F(hi - lo))
    scale = F(F(1) / iscale)
    levels = [max(0, min(nmax, _nearest(F(iscale * F(v - lo))))) for v in x]
    best = F(0)
    for i in range(32):
        diff = F(F(F(scale * F(levels[i])) + lo) - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(0.1) * F(step))) + F(nmax)) / F(hi - lo))
        aux = [max(0, min(nmax, _nearest(F(iscale * F(v - lo))))) for v in x]
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


def ggml_k_block(x: np.ndarray, qtype: QuantType) -> list[int]:
    """One super-block of 256 as ggml-quants.c's quantize_row_q4_K_ref / quantize_row_q5_K_ref writes it,
    in float32: d, dmin, 12 bytes of scales and mins, (Q5_K: qh, 32 bytes: bit j of qh[i] the fifth bit of
    piece j's level i,) qs."""
    nmax, rmin, nstep = _K_FITS[qtype]
    scales, mins, levels = [], [], []
    for j in range(8):
        piece = x[32 * j:32 * j + 32]
        sum_x2 = F(0)
        for v in piece:
            sum_x2 = F(sum_x2 + F(v * v))
        av = F(np.sqrt(F(sum_x2 / F(32))))
        weights = np.array([F(av + abs(v)) for v in piece], dtype=F)
        scale, the_min, piece_levels = _fit(piece, weights, nmax, rmin, nstep)
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
            levels[32 * j + i] = max(0, min(nmax, _nearest(F(F(x[32 * j + i] + dm) / dj))))
    qh = [sum((levels[32 * j + i] >> 4) << j for j in range(8)) for i in range(32)] if nmax > 15 else []
    qs = [(levels[64 * c + i] & 0xF) | (levels[64 * c + 32 + i] & 0xF) << 4
          for c in range(4) for i in range(32)]
    return list(d.tobytes()) + list(dmin.tobytes()) + packed + qh + qs


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


@pytest.mark.parametrize("qtype", [QuantType.Q4_K, QuantType.Q5_K], ids=lambda q: q.name)
def test_q4_k_q5_k_blocks_are_ggml_reference_bytes(qtype: QuantType) -> None:
    """csrc/quantize_k.h fits 16 pieces side by side in vector registers; each still takes ggml's scalar
    steps in their order (Q5_K: the same fit with 31 levels and its own grids)."""
    for name, w in odd_k_inputs().items():
        got = quantize(w, qtype)
        assert got.qtype is qtype and got.shape == tuple(w.shape)
        expected = [b for block in w.numpy().reshape(-1, 256) for b in ggml_k_block(block, qtype)]
        assert got.blocks.reshape(-1).tolist() == expected, name


def test_q4_k_q5_k_same_bytes_from_every_build(kernel: QuantLinearKernel) -> None:
    """The scalar build converts to half precision in software, the others with F16C; tiny values reach
    subnormal and zero half-precision scales."""
    rng = np.random.default_rng(4)
    rows = [rng.normal(0, s, 512) for s in (1e-6, 1e-4, 0.02, 5.0)] + [np.full(512, 3e-7), np.zeros(512)]
    rows += [np.abs(rng.normal(0, 1, 512)), rng.integers(-40, 40, 512)]
    w = torch.from_numpy(np.asarray(rows, dtype=F))
    assert torch.equal(kernel.quantize_q4_k(w), quantize(w, QuantType.Q4_K).blocks)
    assert torch.equal(kernel.quantize_q5_k(w), quantize(w, QuantType.Q5_K).blocks)


def test_q4_k_beats_q4_0_at_the_same_size() -> None:
    """Its reason to exist: 4.5 bits a weight as Q4_0, a fitted scale and offset per 32."""
    w = torch.from_numpy(np.random.default_rng(3).normal(0, 0.02, (64, 1024)).astype(F))
    q4_k, q4_0 = quantize(w, QuantType.Q4_K), quantize(w, QuantType.Q4_0)
    assert q4_k.blocks.numel() == q4_0.blocks.numel()
    rmse = {q.qtype: float((q.dequantize() - w).pow(2).mean().sqrt()) for q in (q4_k, q4_0)}
    assert rmse[QuantType.Q4_K] < 0.9 * rmse[QuantType.Q4_0], rmse


def _nearest_int(v: np.float32) -> int:
    """ggml's nearest_int as written: 1.5 * 2^23 added in float32, the low 23 bits of the sum read back
    (round half to even below 2^22; what ggml gives beyond)."""
    bits = int(np.array([F(v) + F(12582912.0)], dtype=F).view(np.int32)[0])
    return (bits & 0x7FFFFF) - 0x400000


def _qx_fit(x: np.ndarray) -> tuple[np.float32, list[int]]:
    """ggml-quants.c's make_qx_quants(16, 32, x, L, 1, NULL) (rmse_type 1: weights x^2), statement by
    statement in float32: (scale, L)."""
    nmax = 32
    top, amax = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, top = abs(v), v
    if amax < F(1e-15):  # GROUP_MAX_EPS
        return F(0), [0] * 16
    iscale = F(F(-nmax) / top)
    levels = []
    sumlx = suml2 = F(0)
    for v in x:
        lv = max(-nmax, min(nmax - 1, _nearest_int(F(iscale * v))))
        levels.append(lv + nmax)
        w = F(v * v)
        sumlx = F(sumlx + F(F(w * v) * F(lv)))
        suml2 = F(suml2 + F(F(w * F(lv)) * F(lv)))
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = F(F(-F(F(nmax) + F(F(0.1) * F(step)))) / top)
        sumlx = suml2 = F(0)
        for v in x:
            lv = max(-nmax, min(nmax - 1, _nearest_int(F(iscale * v))))
            w = F(v * v)
            sumlx = F(sumlx + F(F(w * v) * F(lv)))
            suml2 = F(suml2 + F(F(w * F(lv)) * F(lv)))
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            levels = [nmax + max(-nmax, min(nmax - 1, _nearest_int(F(iscale * v)))) for v in x]
            scale = F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale, levels


def ggml_q6_k_block(x: np.ndarray) -> list[int]:
    """One super-block of 256 as ggml-quants.c's quantize_row_q6_K_ref writes it, in float32: ql (128
    bytes), qh (64), 16 int8 scales, fp16 d."""
    scales, levels = [], []
    for j in range(16):
        scale, sub_levels = _qx_fit(x[16 * j:16 * j + 16])
        scales.append(scale)
        levels += sub_levels
    max_scale, max_abs = F(0), F(0)
    for scale in scales:
        if abs(scale) > max_abs:
            max_abs, max_scale = abs(scale), scale
    if max_abs < F(1e-15):
        return [0] * 210
    iscale = F(F(-128) / max_scale)
    d = np.float16(F(F(1) / iscale))
    sc = [min(127, _nearest_int(F(iscale * scale))) for scale in scales]  # int8: -128..127
    for j in range(16):
        dj = F(F(d) * F(sc[j]))
        if not dj:
            continue
        for i in range(16):
            lv = _nearest_int(F(x[16 * j + i] / dj))
            levels[16 * j + i] = max(-32, min(31, lv)) + 32
    ql, qh = [0] * 128, [0] * 64
    for half in range(2):
        at = levels[128 * half:128 * half + 128]
        for i in range(32):
            ql[64 * half + i] = (at[i] & 0xF) | (at[i + 64] & 0xF) << 4
            ql[64 * half + i + 32] = (at[i + 32] & 0xF) | (at[i + 96] & 0xF) << 4
            qh[32 * half + i] = (at[i] >> 4 | (at[i + 32] >> 4) << 2 | (at[i + 64] >> 4) << 4
                                 | (at[i + 96] >> 4) << 6)
    return ql + qh + [s & 0xFF for s in sc] + list(d.tobytes())


def odd_q6_k_inputs() -> dict[str, torch.Tensor]:
    """Rows of super-blocks (256 values, 16 sub-blocks of 16) that reach the fit's branches."""
    rng = np.random.default_rng(5)
    spreads = (1e-6, 1e-3, 0.02, 1.0, 300.0)  # 1e-6 and 1e-3: subnormal half-precision d
    cases: dict[str, Any] = {f"normal-{s:g}": rng.normal(0, s, (2, 256)) for s in spreads}
    spike = rng.normal(0, 0.02, (2, 256))
    spike[:, 37] = [1e3, -1e3]  # the other sub-blocks' int8 scales round to 0: their fitted levels stay
    mixed = rng.normal(0, 1, (2, 256)) * np.repeat(10.0 ** rng.integers(-8, 3, (2, 16)), 16, axis=1)
    cases |= {
        "zeros": np.zeros((1, 256)),
        "under-eps": rng.normal(0, 1e-17, (1, 256)),  # every sub-block all-zero
        "scales-under-eps": rng.normal(0, 1e-14, (1, 256)),  # values over it, scales under: a zero block
        "one-zero-sub-block": np.concatenate([np.zeros((2, 16)), rng.normal(0, 1, (2, 240))], axis=1),
        "constant-sub-blocks": np.repeat(rng.normal(0, 1, (2, 16)), 16, axis=1),
        "spike": spike,
        "negative": -np.abs(rng.normal(0, 1, (2, 256))),
        # sub-blocks around -1 or 0: the largest magnitude negative, or either sign
        "negative-dominated": rng.normal(0, 0.1, (2, 256)) - np.repeat(rng.integers(0, 2, (2, 16)), 16, 1),
        "positive": np.abs(rng.normal(0, 1, (2, 256))),
        "integers": rng.integers(-40, 40, (2, 256)),  # level ties
        "mixed-magnitudes": mixed,
        "past-fp16": rng.normal(0, 1e9, (1, 256)),  # d overflows to inf, sumlx^2 to inf
        "three-blocks": rng.normal(0, 0.05, (1, 768)),
    }
    return {name: torch.from_numpy(np.asarray(a, dtype=F)) for name, a in cases.items()}


def test_q6_k_blocks_are_ggml_reference_bytes() -> None:
    """csrc/quantize_q6k.h fits a super-block's 16 sub-blocks side by side in vector registers; each still
    takes ggml's scalar steps in their order."""
    for name, w in odd_q6_k_inputs().items():
        got = quantize(w, QuantType.Q6_K)
        assert got.qtype is QuantType.Q6_K and got.shape == tuple(w.shape)
        with np.errstate(all="ignore"):
            expected = [b for block in w.numpy().reshape(-1, 256) for b in ggml_q6_k_block(block)]
        assert got.blocks.reshape(-1).tolist() == expected, name


def _ggml_base() -> ctypes.CDLL | None:
    """llama-cpp-python's build of ggml (its exported reference quantizers), if it is installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    found = sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*"))
    return ctypes.CDLL(str(found[0])) if found else None


@pytest.mark.skipif(_ggml_base() is None, reason="llama-cpp-python (its libggml-base) is not installed")
@pytest.mark.parametrize("qtype", [QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K], ids=lambda q: q.name)
def test_k_quants_are_ggmls_own_bytes(qtype: QuantType) -> None:
    """ggml's own quantize_row_q{4,5,6}_K_ref, as llama.cpp's quantizer runs it (no importance matrix),
    writes the very same bytes: on the odd inputs and on weights of the usual spreads and tails."""
    lib = _ggml_base()
    assert lib is not None
    fn = getattr(lib, f"quantize_row_{qtype.name[:2].lower()}_K_ref")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    rng = np.random.default_rng(6)
    nonfinite = rng.normal(0, 1, (5, 256)).astype(F)  # garbage in, ggml's garbage out
    nonfinite[0, 0] = nonfinite[1, 5] = nonfinite[4] = np.nan
    nonfinite[2, 3], nonfinite[3, 7] = np.inf, -np.inf
    cases = odd_q6_k_inputs() | odd_k_inputs() | {"nonfinite": torch.from_numpy(nonfinite),
        "normal": torch.from_numpy(rng.normal(0, 0.02, (64, 1024)).astype(F)),
        "student-t": torch.from_numpy((rng.standard_t(2, (64, 1024)) * 0.01).astype(F)),
        "sparse": torch.from_numpy((rng.laplace(0, 0.05, (64, 1024)) * (rng.random((64, 1024)) < 0.3))
                                   .astype(F))}
    for name, w in cases.items():
        x = np.ascontiguousarray(w.numpy())
        theirs = np.zeros(x.size // 256 * qtype.block_bytes, dtype=np.uint8)
        fn(x.ctypes.data, theirs.ctypes.data, x.size)
        assert np.array_equal(quantize(w, qtype).blocks.numpy().reshape(-1), theirs), name


def test_q6_k_same_bytes_from_every_build(kernel: QuantLinearKernel) -> None:
    """The scalar build converts to half precision in software, the others with F16C; tiny values reach
    subnormal and zero half-precision scales."""
    rng = np.random.default_rng(7)
    rows = [rng.normal(0, s, 512) for s in (1e-9, 1e-6, 1e-4, 0.02, 5.0, 1e9)]
    rows += [np.full(512, 3e-7), np.zeros(512), np.repeat(rng.integers(-40, 40, 32), 16)]
    w = torch.from_numpy(np.asarray(rows, dtype=F))
    assert torch.equal(kernel.quantize_q6_k(w), quantize(w, QuantType.Q6_K).blocks)


def test_q6_k_dequantized_within_half_a_step() -> None:
    """Read back by gguf-py, every value is within half its sub-block's step d sc_j of the original, but
    for the few that the fitted scale leaves past the levels' ends (-32, 31), which are clamped there."""
    w = torch.from_numpy(np.random.default_rng(8).normal(0, 0.02, (64, 1024)).astype(F))
    q = quantize(w, QuantType.Q6_K)
    blocks = q.blocks.numpy().reshape(-1, 210)
    d = blocks[:, 208:210].copy().view(np.float16).astype(F)  # [blocks, 1]
    step = np.repeat(d * blocks[:, 192:208].view(np.int8).astype(F), 16, axis=1).reshape(-1)  # signed
    x = w.numpy().reshape(-1)
    err = np.abs(q.dequantize().numpy().reshape(-1) - x)
    ratio = x / step  # the level it would take unclamped (no sub-block's scale rounds to 0 here)
    inside = (ratio >= -32.5) & (ratio <= 31.5)
    assert np.all(err[inside] <= 0.5001 * np.abs(step[inside]))
    assert inside.mean() > 0.999  # the fit lets a handful out, by less than a step
    clamped = ~inside
    expected = np.abs(x - np.where(ratio < 0, -32, 31) * step)
    assert np.allclose(err[clamped], expected[clamped], rtol=1e-5) and np.all(err < 1.2 * np.abs(step))


def test_k_quant_errors_against_each_other_and_q8_0() -> None:
    """On Gaussian weights the 5.5 bits a weight of Q5_K and 6.56 of Q6_K sit between Q4_K's 4.5 and Q8_0's
    8.5: relative RMS error 0.018 (Q6_K) against Q4_K's 0.071 and Q8_0's 0.0054 (N(0, 0.02), 11008 x
    4096: BENCHMARKS.md)."""
    w = torch.from_numpy(np.random.default_rng(3).normal(0, 0.02, (64, 1024)).astype(F))
    rel = {qt: float((quantize(w, qt).dequantize() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
           for qt in (QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K, QuantType.Q8_0)}
    assert rel[QuantType.Q5_K] < 0.6 * rel[QuantType.Q4_K] and rel[QuantType.Q6_K] < 0.6 * rel[QuantType.Q5_K]
    assert rel[QuantType.Q6_K] < 0.3 * rel[QuantType.Q4_K], rel
    assert rel[QuantType.Q8_0] < 0.5 * rel[QuantType.Q6_K], rel


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
    for qtype in (QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K):
        with pytest.raises(ValueError, match="multiple of 256"):
            quantize(torch.zeros(2, 576), qtype)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.zeros(2, 48), QuantType.Q8_0)
    with pytest.raises(ValueError, match="only a float matrix"):
        quantize(torch.zeros(64), QuantType.Q8_0)
    with pytest.raises(ValueError, match="only a float matrix"):
        quantize(torch.zeros(2, 64, dtype=torch.int32), QuantType.Q8_0)


def _config(hidden: int, intermediate: int, layers: int, tie: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 64, head_dim=64,
                       tie_word_embeddings=tie)


def _types(quantization: Quantization, config: ModelConfig, layer: int) -> dict[str, QuantType | None]:
    h, i, p = config.hidden_size, config.intermediate_size, f"model.layers.{layer}."
    shapes = {"model.embed_tokens.weight": (1000, h), "lm_head.weight": (1000, h), "model.norm.weight": (h,),
              p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
              p + "self_attn.k_proj.weight": (h, h), p + "self_attn.v_proj.weight": (h, h),
              p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h),
              p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
    return {name.removeprefix(p): target_type(name, shape, quantization, config)
            for name, shape in shapes.items()}


def test_q4_k_m_is_llama_cpps_mix() -> None:
    """llama.cpp's Q4_K_M (llama-quant.cpp): v and down in Q6_K in the first and last eighth of the
    layers and every third between (16 of a 7B's 32), the head Q6_K, everything else Q4_K, the
    embedding too when the head is its own; a tied embedding is the head. Rows not a multiple of 256
    (SmolLM2's 576) fall back as llama.cpp's do: Q6_K to Q8_0, Q4_K to Q4_1 (llama.cpp: Q5_0)."""
    q4_k_m, k, six = Quantization.Q4_K_M, QuantType.Q4_K, QuantType.Q6_K
    llama7b = _config(4096, 11008, 32)
    more = [i for i in range(32) if _types(q4_k_m, llama7b, i)["self_attn.v_proj.weight"] is six]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for i in range(32):
        types = _types(q4_k_m, llama7b, i)
        v, down = types.pop("self_attn.v_proj.weight"), types.pop("mlp.down_proj.weight")
        assert v is down is (six if i in more else k)
        assert types == {"model.embed_tokens.weight": k, "lm_head.weight": six, "model.norm.weight": None,
                         "input_layernorm.weight": None, "self_attn.q_proj.weight": k,
                         "self_attn.k_proj.weight": k, "self_attn.o_proj.weight": k,
                         "mlp.gate_proj.weight": k, "mlp.up_proj.weight": k}, i
    assert _types(q4_k_m, _config(4096, 11008, 32, tie=True), 5)["model.embed_tokens.weight"] is six
    smollm2 = _config(576, 1536, 30, tie=True)
    assert [i for i in range(30) if _types(q4_k_m, smollm2, i)["mlp.down_proj.weight"] is six] == \
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    layer0 = _types(q4_k_m, smollm2, 0)
    assert layer0["self_attn.v_proj.weight"] is layer0["model.embed_tokens.weight"] is QuantType.Q8_0
    assert layer0["self_attn.q_proj.weight"] is QuantType.Q4_1 and layer0["mlp.down_proj.weight"] is six
    assert _types(q4_k_m, smollm2, 3)["self_attn.v_proj.weight"] is QuantType.Q4_1


def test_q5_k_m_is_q4_k_ms_mix_on_q5_k() -> None:
    """llama.cpp's Q5_K_M: Q4_K_M's layers and tensors in Q6_K, Q5_K for the rest; Q5_K falls back to Q8_0
    (llama.cpp: Q5_1, which the kernel lacks)."""
    llama7b, five, six = _config(4096, 11008, 32), QuantType.Q5_K, QuantType.Q6_K
    for i in range(32):
        q4, q5 = _types(Quantization.Q4_K_M, llama7b, i), _types(Quantization.Q5_K_M, llama7b, i)
        assert q5 == {name: five if kind is QuantType.Q4_K else kind for name, kind in q4.items()}, i
    assert _types(Quantization.Q5_K_M, llama7b, 1)["lm_head.weight"] is six
    layer3 = _types(Quantization.Q5_K_M, _config(576, 1536, 30, tie=True), 3)
    assert layer3["self_attn.v_proj.weight"] is layer3["model.embed_tokens.weight"] is QuantType.Q8_0
    assert layer3["mlp.down_proj.weight"] is five  # 1536 columns


def test_q4_k_is_llama_cpps_q4_k_s() -> None:
    """llama.cpp's Q4_K_S: Q4_K but for v of the first 4 layers and down of the first eighth, in Q5_K."""
    llama7b = _config(4096, 11008, 32)
    for i in range(32):
        types = _types(Quantization.Q4_K, llama7b, i)
        assert types.pop("self_attn.v_proj.weight") is (QuantType.Q5_K if i < 4 else QuantType.Q4_K), i
        assert types.pop("mlp.down_proj.weight") is (QuantType.Q5_K if i < 4 else QuantType.Q4_K), i
        assert types.pop("lm_head.weight") is QuantType.Q6_K
        assert {t for t in types.values() if t is not None} == {QuantType.Q4_K}
    few = _config(4096, 11008, 6)  # 6 // 8: no down in Q5_K
    assert all(_types(Quantization.Q4_K, few, i)["mlp.down_proj.weight"] is QuantType.Q4_K for i in range(6))
    assert _types(Quantization.Q4_K, _config(576, 1536, 30), 0)["self_attn.v_proj.weight"] is QuantType.Q8_0


@pytest.mark.parametrize("quantization", [Quantization.Q8_0, Quantization.Q4_0, Quantization.Q4_1,
                                          Quantization.Q4_K], ids=lambda q: q.name)
def test_head_type_as_llama_cpps(quantization: Quantization) -> None:
    """One type throughout (q4_k: from layer 4 on) but for the head, Q6_K for every 4-bit type as llama.cpp
    gives it (Q8_0 where the rows are not a multiple of 256, and for q8_0), the tied embedding too, being
    the head."""
    base = quant_type(quantization)
    head = QuantType.Q8_0 if quantization is Quantization.Q8_0 else QuantType.Q6_K
    for tie in (False, True):
        types = _types(quantization, _config(512, 1024, 8, tie), 5)
        assert types.pop("lm_head.weight") is head and types.pop("model.norm.weight") is None
        assert types.pop("model.embed_tokens.weight") is (head if tie else base)
        assert types.pop("input_layernorm.weight") is None and set(types.values()) == {base}
    narrow = _types(quantization, _config(576, 1536, 8, tie=True), 5)
    assert narrow["lm_head.weight"] is narrow["model.embed_tokens.weight"] is QuantType.Q8_0
    assert narrow["self_attn.q_proj.weight"] is (QuantType.Q4_1 if base is QuantType.Q4_K else base)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tiny_hf_dir(tmp_path_factory.mktemp("hf"))
    write_byte_level_tokenizer(root)
    return root


@pytest.mark.parametrize("quantization", list(Quantization), ids=lambda q: q.name)
def test_quantized_at_load_as_gguf_py_would(hf_dir: Path, quantization: Quantization) -> None:
    """Projections and embedding in the chosen type (q4_k_m, q5_k_m: v and down of the second of two
    layers in Q6_K; q4_k: v in Q5_K), the untied head Q6_K (q8_0: Q8_0), norms float32."""
    qtype = quant_type(quantization)
    _, state = load_hf_quantized(hf_dir, torch.float32, quantization)
    _, stored = hf_tensors(hf_dir)
    assert set(state) == set(stored)
    for name, lazy in stored.items():
        weight, original = state[name], lazy.load()
        if original.dim() == 1:
            assert isinstance(weight, torch.Tensor) and torch.equal(weight, original.float()), name
            continue
        kind = qtype
        if name == "lm_head.weight":
            kind = QuantType.Q8_0 if quantization is Quantization.Q8_0 else QuantType.Q6_K
        elif quantization in (Quantization.Q4_K_M, Quantization.Q5_K_M) and \
                name.startswith("model.layers.1.") and name.endswith(("v_proj.weight", "down_proj.weight")):
            kind = QuantType.Q6_K
        elif quantization is Quantization.Q4_K and name.endswith("v_proj.weight"):
            kind = QuantType.Q5_K
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

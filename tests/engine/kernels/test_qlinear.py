"""The quantized-weight projection kernel (csrc/qlinear.c) against gguf-py's reference dequantization
followed by an fp32 matmul, and against a pure-torch emulation of its exact scheme; every build that
differs on this CPU (qlinear_helpers): the native one (AVX-512 VNNI, AVX-VNNI or AVX2), the AVX2 one where
the CPU has AVX-512 (-mno-avx512f), the AVX-VNNI one where it has AVX-512 VNNI (vpdpbusd on ymm registers,
through its EVEX encoding: -DQLINEAR_YMM_VNNI), and the scalar fallback (-mno-avx2 -mno-avx512f -mno-f16c).

The tolerance against the reference, derived: the kernel quantizes each block of 32 activations to int8
with d_a = amax(block) / 127, rounding to nearest, so each activation moves by at most d_a / 2 =
amax / 254; the weights are used exactly as stored. An output therefore differs from x @ W.T by at most
sum over blocks b of amax_b(x) / 254 * sum_{i in b} |W_i|, plus float rounding (allowed for by 1% of the
bound and 1e-5). The emulation tests show that this is the only error: quantizing x the same way in
torch and summing the integer dots in float64 reproduces the kernel to float rounding.

The K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256, K a multiple of 256) meet the same blocks of 32
activations and have the same bound. gguf-py cannot quantize them: their blocks here are random bytes
with sane fp16 scales, which reach every bit pattern of the quants and the packed 6-bit scales.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qlinear_helpers import ymm_vnni

from loraserve.engine.kernels import build as kernel_build
from loraserve.engine.kernels.qlinear import QuantLinearKernel, dequantize, load_qlinear

import kernel_builds
from gguf_helpers import k_quant_pieces, quantize_k, random_k_blocks

if kernel_build.compiler() is None:
    pytest.skip("no C compiler on this machine: there is no quantized kernel", allow_module_level=True)

Q = gguf.GGMLQuantizationType
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1)  # blocks of 32
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # super-blocks of 256
ALL_TYPES = TYPES + K_TYPES


@functools.cache
def _weights(qtype: Q, n: int, k: int) -> torch.Tensor:
    rng = np.random.default_rng(n * 10007 + k)
    if qtype in K_TYPES:
        return torch.from_numpy(random_k_blocks(qtype, n, k, rng))
    return torch.from_numpy(gguf.quants.quantize(rng.standard_normal((n, k), dtype=np.float32), qtype))


def _k(qtype: Q, k: int) -> int:
    """A fan-in of k's size that the type takes: K-quants need a multiple of 256."""
    return k if qtype in TYPES else max(256, k // 256 * 256)


def _x(t: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, k, generator=torch.Generator().manual_seed(seed))


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[T, N]: sum over blocks of amax_b(x) / 254 * sum_b |W| (the module docstring)."""
    t, k = x.shape
    amax = x.abs().reshape(t, k // 32, 32).amax(-1).double()  # [T, B]
    wabs = w.abs().reshape(w.shape[0], k // 32, 32).sum(-1).double()  # [N, B]
    return (amax / 254) @ wabs.T


def _decode(blocks: torch.Tensor, qtype: Q, n: int,
            k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks read by the layout the kernel assumes: d_w, c_w [N, B] float32 and q_w [N, B, 32] int64
    with W = d_w * q_w + c_w (c_w = -8 d_w for Q4_0, m for Q4_1, 0 for Q8_0; for the K-quants B counts
    pieces of 32, q_w holds their integer scales: gguf_helpers.k_quant_pieces)."""
    if qtype in K_TYPES:
        d, c, q = k_quant_pieces(blocks.numpy(), qtype, n)
        return torch.from_numpy(d), torch.from_numpy(c), torch.from_numpy(q)
    b = blocks.reshape(n, k // 32, -1)
    d = b[..., :2].contiguous().view(torch.float16).float().squeeze(-1)
    if qtype == Q.Q8_0:
        return d, torch.zeros_like(d), b[..., 2:].contiguous().view(torch.int8).long()
    qs = b[..., 4 if qtype == Q.Q4_1 else 2:].long()
    q = torch.cat([qs & 15, qs >> 4], dim=-1)  # element j < 16: low nibble of byte j; j >= 16: high of j - 16
    c = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) if qtype == Q.Q4_1 else -8 * d
    return d, c, q


def _emulate(x: torch.Tensor, blocks: torch.Tensor, qtype: Q, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's scheme in torch: x to int8 per block as the kernel does it (float32 d_a = amax / 127,
    1 / d_a, round half to even), integer dots per block, then the float32 scales, summed in float64.
    Returns the result [T, N] and, for the tolerance, the sum of the absolute values of its terms."""
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    da = xb.abs().amax(-1) / 127  # float32, as in C
    inv = torch.where(da == 0, torch.zeros_like(da), 1 / da)
    qa = torch.round(xb * inv.unsqueeze(-1))  # float32 product, then nearest even
    sa = da * qa.sum(-1)  # float32 product of an exact integer
    dw, cw, qw = _decode(blocks, qtype, n, k)
    dot = torch.einsum("tbi,nbi->tnb", qa.double(), qw.double())  # exact integers
    absdot = torch.einsum("tbi,nbi->tnb", qa.abs().double(), qw.abs().double())
    scale = (dw.unsqueeze(0) * da.unsqueeze(1)).double()  # [T, N, B]: d_w * d_a rounded to float32
    offset = (cw.unsqueeze(0) * sa.unsqueeze(1).double()) if qtype != Q.Q8_0 else torch.zeros_like(scale)
    return (scale * dot + offset).sum(-1), (scale.abs() * absdot + offset.abs()).sum(-1)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_the_layout_read_is_gguf_s(qtype: Q) -> None:
    """The emulation's reading of the blocks (the kernel's) gives gguf-py's dequantized weights."""
    k = _k(qtype, 96) * 2
    blocks = _weights(qtype, 33, k)
    d, c, q = _decode(blocks, qtype, 33, k)
    mine = (d.unsqueeze(-1) * q.float() + c.unsqueeze(-1)).reshape(33, k)
    torch.testing.assert_close(mine, dequantize(blocks, qtype, 33, k), atol=1e-6, rtol=1e-6)


def test_block_sizes_are_gguf_s(kernel: QuantLinearKernel) -> None:
    assert kernel.block_bytes == {int(t): gguf.GGML_QUANT_SIZES[t][1] for t in ALL_TYPES}


def _ids(value: object) -> str:
    return value.name if isinstance(value, Q) else str(value)


@pytest.mark.parametrize(("qtype", "k"), [(q, k) for q in TYPES for k in (32, 96, 576, 1536)]
                         + [(q, k) for q in K_TYPES for k in (256, 512, 2816)], ids=_ids)
def test_within_the_activation_quantization_bound(kernel: QuantLinearKernel, qtype: Q, k: int) -> None:
    worst = 0.0
    for n in (1, 7, 33, 577):
        blocks = _weights(qtype, n, k)
        w = dequantize(blocks, qtype, n, k)
        for t in (0, 1, 3, 4, 5, 17, 64, 130):
            x = _x(t, k, seed=t)
            got = kernel(x, blocks, qtype, n, k)
            assert got.shape == (t, n) and got.dtype == torch.float32
            if t == 0:
                continue
            err = (got.double() - F.linear(x, w).double()).abs()
            bound = _bound(x, w)
            assert (err <= bound * 1.01 + 1e-5).all(), f"N {n} T {t}: {(err / bound).max():.3f} of the bound"
            worst = max(worst, float((err / bound).max()))
    # the bound is worst-case (every rounding against the weight's sign), random data reaches a fraction:
    # enough of one that a kernel with a bigger error (a wrong scale, a lost block) would not pass
    assert worst > (0.3 if k == 32 else 0.05)


@pytest.mark.parametrize(("n", "k", "t"), [(33, 96, 17), (577, 576, 5), (7, 1536, 130), (1, 32, 4)])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_matches_an_emulation_of_its_scheme(kernel: QuantLinearKernel, qtype: Q, n: int, k: int,
                                            t: int) -> None:
    """Activation quantization is the whole difference from the reference: the same scheme in torch
    matches to float rounding (float32 sums over K / 32 blocks: 1e-6 of the terms' magnitude, ~16 ulps).
    K-quants at the nearest multiple of 256 (256, 512, 1536, 256)."""
    k = _k(qtype, k)
    blocks, x = _weights(qtype, n, k), _x(t, k, seed=7) * 3
    want, magnitude = _emulate(x, blocks, qtype, n)
    err = (kernel(x, blocks, qtype, n, k).double() - want).abs()
    assert (err <= 1e-6 * magnitude + 1e-7).all(), f"{(err / magnitude).max():.2e} of the terms"
    ref = F.linear(x, dequantize(blocks, qtype, n, k)).double()
    assert (want - ref).abs().max() > 1000 * err.max()  # the emulation is much closer than the reference


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_subnormal_and_zero_scales(kernel: QuantLinearKernel, qtype: Q) -> None:
    """Tiny weights have fp16 scales below fp16's normal range, an all-zero block has d = 0: both read as
    gguf-py reads them (the emulation's float16 conversion is torch's). K-quants: their super-block
    scales d (and dmin), by the reference quantizer of gguf_helpers."""
    n, k = 7, _k(qtype, 96)
    tiny = 1e-5 if qtype in TYPES else 1e-3  # both: scales d below 2^-14
    w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32) * tiny
    w[0, :_k(qtype, 32)] = 0
    blocks = torch.from_numpy(quantize_k(w, qtype) if qtype in K_TYPES else gguf.quants.quantize(w, qtype))
    d = _decode(blocks, qtype, n, k)[0]
    assert ((d != 0) & (d.abs() < 2 ** -14)).any() and (d == 0).any()
    x = _x(5, k, seed=2)
    want, magnitude = _emulate(x, blocks, qtype, n)
    err = (kernel(x, blocks, qtype, n, k).double() - want).abs()
    assert (err <= 1e-6 * magnitude + 1e-12).all()
    assert want.abs().max() > 1e-5  # the weights are not all flushed to zero


def test_zero_and_constant_activation_blocks(kernel: QuantLinearKernel) -> None:
    """A block of zeros (d_a = 0: no division by zero) and a constant block (every q_a = 127) are exact
    but for float rounding."""
    n = 7
    for qtype in ALL_TYPES:
        k = _k(qtype, 96)
        x = torch.zeros(3, k)
        x[1, 32:64] = 0.5
        x[2] = -1.25
        blocks = _weights(qtype, n, k)
        want = F.linear(x, dequantize(blocks, qtype, n, k))
        torch.testing.assert_close(kernel(x, blocks, qtype, n, k), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(kernel: QuantLinearKernel, qtype: Q) -> None:
    n, k = 33, _k(qtype, 576)
    blocks, x = _weights(qtype, n, k), _x(70, k, seed=3)
    batched = kernel(x, blocks, qtype, n, k)
    assert torch.equal(kernel(x[5:6], blocks, qtype, n, k)[0], batched[5])
    assert torch.equal(kernel(x[66:70], blocks, qtype, n, k), batched[66:70])  # a tile of 4 in another block
    assert torch.equal(kernel(x[3:9], blocks, qtype, n, k), batched[3:9])  # tiles split differently


@pytest.mark.skipif("avx2" not in kernel_builds.builds(), reason="no AVX-512: the native build is AVX2's")
@pytest.mark.parametrize("vnni", ["native", "avxvnni"])
def test_the_vnni_builds_give_the_avx2_build_s_bits(tmp_path_factory: pytest.TempPathFactory,
                                                    vnni: str) -> None:
    """Weights as stored: the VNNI builds' vpdpbusd (AVX-512 VNNI; AVX-VNNI) gives the same int32 lanes as
    AVX2's maddubs and madd (the K-quants keep those), and the float steps are the same: the same bits,
    every type, odd shapes, T from 1 past a tile of rows."""
    if vnni == "avxvnni" and not ymm_vnni():
        pytest.skip("no AVX-512 VNNI: the AVX-VNNI path is not built here")
    native = load_qlinear() if vnni == "native" else kernel_builds.build(load_qlinear, vnni, tmp_path_factory)
    avx2 = kernel_builds.build(load_qlinear, "avx2", tmp_path_factory)
    assert native is not None and native.vnni and avx2.vector_bits == 256
    for qtype in ALL_TYPES:
        for n, k in ((1, 32), (7, 96), (33, 576), (5, 1536)):
            k = _k(qtype, k)
            blocks = _weights(qtype, n, k)
            for t in (1, 2, 5, 17, 33):
                x = _x(t, k, seed=t) * 3
                got, want = native(x, blocks, qtype, n, k), avx2(x, blocks, qtype, n, k)
                assert torch.equal(got, want), (qtype.name, n, t)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_the_thread_count_does_not_change_the_bits(kernel: QuantLinearKernel, qtype: Q) -> None:
    n, k = 577, _k(qtype, 96)
    blocks, x = _weights(qtype, n, k), _x(130, k, seed=4)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(kernel(x, blocks, qtype, n, k))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K], ids=lambda q: q.name)
def test_rows_with_a_stride_and_a_memory_mapped_weight(kernel: QuantLinearKernel, tmp_path: Path,
                                                       qtype: Q) -> None:
    """x may be a column slice of a wider tensor (rows contiguous, ldx > K); the weight a view of a
    mapped file (how the loader hands GGUF tensors over)."""
    n, k = 33, _k(qtype, 96)
    blocks = _weights(qtype, n, k)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 7 + blocks.numpy().tobytes())  # at an odd offset, as blocks are in a file
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=7, shape=tuple(blocks.shape)))
    wide = _x(9, 2 * k, seed=5)
    got = kernel(wide[:, k:], mapped, qtype, n, k)
    assert torch.equal(got, kernel(wide[:, k:].contiguous(), blocks, qtype, n, k))


def test_refuses_what_it_cannot_read(kernel: QuantLinearKernel) -> None:
    n, k = 7, 96
    blocks, x = _weights(Q.Q8_0, n, k), _x(3, k)
    bad_calls: list[tuple[torch.Tensor, torch.Tensor, int, int, int]] = [
        (x.double(), blocks, Q.Q8_0, n, k),
        (x.T.contiguous().T, blocks, Q.Q8_0, n, k),  # columns contiguous, not rows
        (x[0], blocks, Q.Q8_0, n, k),  # not [T, K]
        (x[:, :64], blocks, Q.Q8_0, n, k),  # K differs from in_features
        (x, blocks.view(torch.int8), Q.Q8_0, n, k),
        (x, blocks[:, :-34], Q.Q8_0, n, k),  # a strided view, and too short
        (x, blocks[:-1], Q.Q8_0, n, k),  # fewer rows than out_features
        (x, blocks, Q.Q4_0, n, k),  # rows of the wrong size for the type
        (x, blocks, Q.Q2_K, n, k),  # a type the kernel lacks
        (x, torch.zeros(n, 144, dtype=torch.uint8), Q.Q4_K, n, k),  # K-quants: K % 256 != 0
        (x, blocks, Q.F32, n, k),
        (_x(3, 40), torch.zeros(n, 68, dtype=torch.uint8), Q.Q8_0, n, 40),  # K % 32 != 0
        (_x(3, 0), torch.zeros(n, 0, dtype=torch.uint8), Q.Q8_0, n, 0),
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            kernel(*args)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(torch.zeros(n, 68, dtype=torch.uint8), Q.Q8_0, n, 40)
    with pytest.raises(ValueError, match="multiple of 256 for Q6_K"):
        kernel(_x(3, 288), torch.zeros(n, 210, dtype=torch.uint8), Q.Q6_K, n, 288)


def test_the_library_refuses_what_the_wrapper_would(kernel: QuantLinearKernel) -> None:
    """The C entry point's own checks (the wrapper's come first): 1 for a type or K it cannot take."""
    x, y = torch.zeros(1, 64), torch.zeros(1, 1)
    w = torch.zeros(1, 68, dtype=torch.uint8)

    def call(qtype: int, k: int, rows: int = 1) -> int:
        ptrs, types = (ctypes.c_void_p * 1)(w.data_ptr()), (ctypes.c_int * 1)(qtype)
        return int(kernel._fn(x.data_ptr(), 1, 64, 1, ptrs, types, (ctypes.c_int64 * 1)(rows), k,
                              y.data_ptr(), 1, 1))

    assert call(int(Q.F32), 64) == 1
    assert call(int(Q.Q8_0), 40) == 1
    assert call(int(Q.Q8_0), 64, rows=-1) == 1
    assert call(int(Q.Q4_K), 64) == 1  # the K-quants need K a multiple of 256
    assert call(int(Q.Q2_K), 256) == 1
    assert call(int(Q.Q8_0), 64) == 0


@pytest.mark.parametrize("t", [1, 5, 70])
def test_stacked_parts_of_mixed_types_equal_each_alone(kernel: QuantLinearKernel, t: int) -> None:
    """A fused projection from its tensors where they lie (no concatenated copy), types mixed as in
    Q4_K_M files: the same bits as each part multiplied alone."""
    k, sizes = 96, [(Q.Q8_0, 7), (Q.Q4_0, 1), (Q.Q4_1, 12)]
    ws = [(_weights(qtype, n, k), int(qtype), n) for qtype, n in sizes]
    x = _x(t, k)
    got = kernel.stacked(x, kernel.parts(ws, k))
    assert torch.equal(got, torch.cat([kernel(x, b, qtype, n, k) for b, qtype, n in ws], dim=1))
    with pytest.raises(ValueError, match="contiguous uint8"):
        kernel.parts([ws[0], (ws[1][0], int(Q.Q8_0), 1)], k)


def test_stacked_k_quant_parts_as_in_q4_k_m_files(kernel: QuantLinearKernel) -> None:
    """Q4_K_M keeps some tensors of a fused projection in Q6_K (or Q5_K, Q8_0): each part is read in
    its own type, with the same bits as alone."""
    k, sizes = 512, [(Q.Q4_K, 9), (Q.Q6_K, 4), (Q.Q5_K, 3), (Q.Q8_0, 5)]
    ws = [(_weights(qtype, n, k), int(qtype), n) for qtype, n in sizes]
    x = _x(6, k)
    got = kernel.stacked(x, kernel.parts(ws, k))
    assert torch.equal(got, torch.cat([kernel(x, b, qtype, n, k) for b, qtype, n in ws], dim=1))

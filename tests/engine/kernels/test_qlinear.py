"""The quantized-weight projection kernel (csrc/qlinear.c) against gguf-py's reference dequantization
followed by an fp32 matmul, and against a pure-torch emulation of its exact scheme; both builds, the
native (AVX2 where the CPU has it) and the scalar fallback (built with -mno-avx2 -mno-avx512f -mno-f16c).

The tolerance against the reference, derived: the kernel quantizes each block of 32 activations to int8
with d_a = amax(block) / 127, rounding to nearest, so each activation moves by at most d_a / 2 =
amax / 254; the weights are used exactly as stored. An output therefore differs from x @ W.T by at most
sum over blocks b of amax_b(x) / 254 * sum_{i in b} |W_i|, plus float rounding (allowed for by 1% of the
bound and 1e-5). The emulation tests show that this is the only error: quantizing x the same way in
torch and summing the integer dots in float64 reproduces the kernel to float rounding.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraserve.engine.kernels import cpu as cpu_kernels
from loraserve.engine.kernels.qlinear import QuantLinearKernel, dequantize, load_qlinear

if cpu_kernels._compiler() is None:
    pytest.skip("no C compiler on this machine: there is no quantized kernel", allow_module_level=True)

Q = gguf.GGMLQuantizationType
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1)


@pytest.fixture(scope="module", params=["native", "scalar"])
def kernel(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantLinearKernel]:
    """The kernel as the engine builds it, and the scalar fallback: the same source with the vector
    instruction sets switched off by a compiler wrapper that appends the flags (a cache of its own)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "scalar":
            cc = cpu_kernels._compiler()
            assert cc is not None
            tmp = tmp_path_factory.mktemp("scalar-cc")
            wrapper = tmp / "cc"
            # -mno-f16c as well: the fallback's own fp16 conversion is tested too
            wrapper.write_text(f'#!/bin/sh\nexec {cc} "$@" -mno-avx2 -mno-avx512f -mno-f16c\n')
            wrapper.chmod(0o755)
            mp.setenv("CC", str(wrapper))
            mp.setenv("LORASERVE_KERNEL_CACHE", str(tmp / "cache"))
        load_qlinear.cache_clear()
        try:
            k = load_qlinear()
            assert k is not None  # a compiler is present: the build must work
            if request.param == "scalar":
                assert k.vector_bits == 0
            elif _cpu_has("avx2"):
                assert k.vector_bits == 256
            yield k
        finally:
            load_qlinear.cache_clear()


def _cpu_has(flag: str) -> bool:
    text = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())


@functools.cache
def _weights(qtype: Q, n: int, k: int) -> torch.Tensor:
    w = np.random.default_rng(n * 10007 + k).standard_normal((n, k), dtype=np.float32)
    return torch.from_numpy(gguf.quants.quantize(w, qtype))


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
    with W = d_w * q_w + c_w (c_w = -8 d_w for Q4_0, m for Q4_1, 0 for Q8_0)."""
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


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_the_layout_read_is_gguf_s(qtype: Q) -> None:
    """The emulation's reading of the blocks (the kernel's) gives gguf-py's dequantized weights."""
    blocks = _weights(qtype, 33, 96)
    d, c, q = _decode(blocks, qtype, 33, 96)
    mine = (d.unsqueeze(-1) * q.float() + c.unsqueeze(-1)).reshape(33, 96)
    torch.testing.assert_close(mine, dequantize(blocks, qtype, 33, 96), atol=1e-6, rtol=1e-6)


def test_block_sizes_are_gguf_s(kernel: QuantLinearKernel) -> None:
    assert kernel.block_bytes == {int(t): gguf.GGML_QUANT_SIZES[t][1] for t in TYPES}


@pytest.mark.parametrize("k", [32, 96, 576, 1536])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
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
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_matches_an_emulation_of_its_scheme(kernel: QuantLinearKernel, qtype: Q, n: int, k: int,
                                            t: int) -> None:
    """Activation quantization is the whole difference from the reference: the same scheme in torch
    matches to float rounding (float32 sums over K / 32 blocks: 1e-6 of the terms' magnitude, ~16 ulps)."""
    blocks, x = _weights(qtype, n, k), _x(t, k, seed=7) * 3
    want, magnitude = _emulate(x, blocks, qtype, n)
    err = (kernel(x, blocks, qtype, n, k).double() - want).abs()
    assert (err <= 1e-6 * magnitude + 1e-7).all(), f"{(err / magnitude).max():.2e} of the terms"
    ref = F.linear(x, dequantize(blocks, qtype, n, k)).double()
    assert (want - ref).abs().max() > 1000 * err.max()  # the emulation is much closer than the reference


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_subnormal_and_zero_scales(kernel: QuantLinearKernel, qtype: Q) -> None:
    """Tiny weights have fp16 scales below fp16's normal range, an all-zero block has d = 0: both read as
    gguf-py reads them (the emulation's float16 conversion is torch's)."""
    n, k = 7, 96
    w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32) * 1e-5
    w[0, :32] = 0
    blocks = torch.from_numpy(gguf.quants.quantize(w, qtype))
    d = blocks.reshape(n, k // 32, -1)[..., :2].contiguous().view(torch.float16).float()
    assert ((d != 0) & (d.abs() < 2 ** -14)).any() and (d == 0).any()
    x = _x(5, k, seed=2)
    want, magnitude = _emulate(x, blocks, qtype, n)
    err = (kernel(x, blocks, qtype, n, k).double() - want).abs()
    assert (err <= 1e-6 * magnitude + 1e-12).all()
    assert want.abs().max() > 1e-5  # the weights are not all flushed to zero


def test_zero_and_constant_activation_blocks(kernel: QuantLinearKernel) -> None:
    """A block of zeros (d_a = 0: no division by zero) and a constant block (every q_a = 127) are exact
    but for float rounding."""
    k, n = 96, 7
    x = torch.zeros(3, k)
    x[1, 32:64] = 0.5
    x[2] = -1.25
    for qtype in TYPES:
        blocks = _weights(qtype, n, k)
        want = F.linear(x, dequantize(blocks, qtype, n, k))
        torch.testing.assert_close(kernel(x, blocks, qtype, n, k), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(kernel: QuantLinearKernel, qtype: Q) -> None:
    n, k = 33, 576
    blocks, x = _weights(qtype, n, k), _x(70, k, seed=3)
    batched = kernel(x, blocks, qtype, n, k)
    assert torch.equal(kernel(x[5:6], blocks, qtype, n, k)[0], batched[5])
    assert torch.equal(kernel(x[66:70], blocks, qtype, n, k), batched[66:70])  # a tile of 4 in another block
    assert torch.equal(kernel(x[3:9], blocks, qtype, n, k), batched[3:9])  # tiles split differently


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_the_thread_count_does_not_change_the_bits(kernel: QuantLinearKernel, qtype: Q) -> None:
    n, k = 577, 96
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


def test_rows_with_a_stride_and_a_memory_mapped_weight(kernel: QuantLinearKernel, tmp_path: Path) -> None:
    """x may be a column slice of a wider tensor (rows contiguous, ldx > K); the weight a view of a
    mapped file (how the loader hands GGUF tensors over)."""
    n, k = 33, 96
    blocks = _weights(Q.Q4_0, n, k)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 7 + blocks.numpy().tobytes())  # at an odd offset, as blocks are in a file
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=7, shape=tuple(blocks.shape)))
    wide = _x(9, 2 * k, seed=5)
    got = kernel(wide[:, k:], mapped, Q.Q4_0, n, k)
    assert torch.equal(got, kernel(wide[:, k:].contiguous(), blocks, Q.Q4_0, n, k))


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
        (x, blocks, Q.Q4_K, n, k),  # a type the kernel lacks
        (x, blocks, Q.F32, n, k),
        (_x(3, 40), torch.zeros(n, 68, dtype=torch.uint8), Q.Q8_0, n, 40),  # K % 32 != 0
        (_x(3, 0), torch.zeros(n, 0, dtype=torch.uint8), Q.Q8_0, n, 0),
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            kernel(*args)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(torch.zeros(n, 68, dtype=torch.uint8), Q.Q8_0, n, 40)


def test_the_library_refuses_what_the_wrapper_would(kernel: QuantLinearKernel) -> None:
    """The C entry point's own checks (the wrapper's come first): 1 for a type or K it cannot take."""
    x, y = torch.zeros(1, 64), torch.zeros(1, 1)
    w = torch.zeros(1, 68, dtype=torch.uint8)
    assert kernel._fn(x.data_ptr(), 1, 64, w.data_ptr(), int(Q.Q4_K), 1, 64, y.data_ptr(), 1, 1) == 1
    assert kernel._fn(x.data_ptr(), 1, 64, w.data_ptr(), int(Q.Q8_0), 1, 40, y.data_ptr(), 1, 1) == 1
    assert kernel._fn(x.data_ptr(), 1, 64, w.data_ptr(), int(Q.Q8_0), 1, 64, y.data_ptr(), 1, 1) == 0

"""Weights repacked in groups of 8 rows (csrc/qlinear_x8.h; the K-quants' groups: qlinear_x8k.h), every
build that differs on this CPU (the native one, AVX-512 VNNI where the CPU has it, AVX2, scalar:
qlinear_helpers).

The repacked kernel quantizes the activations exactly as the stored-layout one does and computes the same
integer dot per block; only where each block's float product is added differs (its own lane rather than
eight partial lanes). So it is checked against the stored-layout kernel, itself checked against gguf-py's
reference in test_qlinear.py, to float rounding: a relative 1e-5 of the output's scale.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from qlinear_helpers import ymm_vnni

from loraserve.engine.kernels.qlinear import QuantLinearKernel, Repacked, dequantize, load_qlinear

import kernel_builds
from gguf_helpers import random_k_blocks

Q = gguf.GGMLQuantizationType
K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # super-blocks of 256
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, *K_TYPES)
SHAPES = [(1, 32), (13, 96), (64, 576), (67, 1536)]  # rows not a multiple of 8 leave a partial group


def _k(qtype: Q, k: int) -> int:
    """A fan-in of k's size that the type takes: K-quants need a multiple of 256."""
    return max(256, k // 256 * 256) if qtype in K_TYPES else k


def _blocks(qtype: Q, n: int, k: int, seed: int = 0) -> torch.Tensor:
    if qtype in K_TYPES:  # gguf-py cannot quantize them: random bytes with sane scales (gguf_helpers)
        return torch.from_numpy(random_k_blocks(qtype, n, k, np.random.default_rng(seed)))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype))


def _group_bytes(qtype: Q, row_bytes: int) -> int:
    """A group's bytes for 8 rows of row_bytes: the rows' own, plus the K-quants' decoded 6-bit scales."""
    extra = {Q.Q4_K: 1184 - 1152, Q.Q5_K: 1440 - 1408}.get(qtype, 0)
    return 8 * row_bytes + extra * row_bytes // gguf.GGML_QUANT_SIZES[qtype][1]


def _x(t: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_rows_come_back_as_stored(kernel: QuantLinearKernel, qtype: Q, n: int, k: int) -> None:
    k = _k(qtype, k)
    blocks = _blocks(qtype, n, k)
    packed = kernel.repack(blocks, int(qtype), n, k)
    assert packed.data.numel() == (n + 7) // 8 * _group_bytes(qtype, blocks.shape[1])  # in whole groups
    assert torch.equal(kernel.stored_rows(packed, torch.arange(n)), blocks)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    reordered = kernel.repack(blocks, int(qtype), n, k, order)
    ids = torch.tensor([n - 1, 0, n // 2, n - 1])
    assert torch.equal(kernel.stored_rows(reordered, ids), blocks[order][ids])


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_same_products_as_the_stored_layout(kernel: QuantLinearKernel, qtype: Q, n: int, k: int) -> None:
    k = _k(qtype, k)
    blocks = _blocks(qtype, n, k)
    parts = kernel.parts([kernel.repack(blocks, int(qtype), n, k)], k)
    for t in (1, 3, 4, 5, 17, 70):
        x = _x(t, k)
        want = kernel(x, blocks, int(qtype), n, k)
        got = kernel.stacked(x, parts)
        scale = x.abs() @ dequantize(blocks, int(qtype), n, k).abs().T  # sum |x| |w| per output
        assert ((got - want).abs() <= 1e-5 * scale + 1e-6).all(), (t, (got - want).abs().max())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_a_row_gets_the_same_bits_alone_in_a_batch_or_threaded(kernel: QuantLinearKernel, qtype: Q) -> None:
    n, k = 67, _k(qtype, 576)
    parts = kernel.parts([kernel.repack(_blocks(qtype, n, k), int(qtype), n, k)], k)
    x = _x(130, k)
    batched = kernel.stacked(x, parts)
    assert torch.equal(kernel.stacked(x[5:6], parts)[0], batched[5])
    assert torch.equal(kernel.stacked(x[66:70], parts), batched[66:70])
    assert torch.equal(kernel.stacked(x[3:9], parts), batched[3:9])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernel.stacked(x, parts), batched)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif("avx2" not in kernel_builds.builds(), reason="no AVX-512: the native build is AVX2's")
@pytest.mark.parametrize("vnni", ["native", "avxvnni"])
def test_the_vnni_builds_give_the_avx2_build_s_bits(tmp_path_factory: pytest.TempPathFactory,
                                                    vnni: str) -> None:
    """The AVX-512 VNNI tile (two groups a zmm, vpdpbusd) and the AVX-VNNI one (a group in ymm registers,
    vpdpbusd) compute each output's integer dots exactly, as the AVX2 tile does, and the same float steps in
    the same order: the same bits, whatever T and however the rows fall into tiles (a lone last group, a
    partial one)."""
    if vnni == "avxvnni" and not ymm_vnni():
        pytest.skip("no AVX-512 VNNI: the AVX-VNNI path is not built here")
    native = load_qlinear() if vnni == "native" else kernel_builds.build(load_qlinear, vnni, tmp_path_factory)
    avx2 = kernel_builds.build(load_qlinear, "avx2", tmp_path_factory)
    assert native is not None and native.vnni and not avx2.vnni and avx2.vector_bits == 256
    for qtype in TYPES:
        for n, k in [*SHAPES, (8, 64), (24, 96)]:
            k = _k(qtype, k)
            blocks = _blocks(qtype, n, k)
            packed, packed2 = native.repack(blocks, int(qtype), n, k), avx2.repack(blocks, int(qtype), n, k)
            for t in (1, 2, 5, 7, 17, 30, 33):
                x = _x(t, k, seed=t) * 3
                got = native.stacked(x, native.parts([packed], k))
                assert torch.equal(got, avx2.stacked(x, avx2.parts([packed2], k))), (qtype.name, n, k, t)


@pytest.mark.skipif("avx2" not in kernel_builds.builds(), reason="no AVX-512: the native build is AVX2's")
def test_a_build_refuses_another_layout_s_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The AVX-512 VNNI build stores Q8_0's quants plus 128 (vpdpbusd's unsigned operand): its groups
    are not the AVX2 build's, and each build refuses the other's rather than read wrong numbers."""
    native, avx2 = load_qlinear(), kernel_builds.build(load_qlinear, "avx2", tmp_path_factory)
    assert native is not None and native.x8_layout != avx2.x8_layout
    blocks = _blocks(Q.Q8_0, 9, 64)
    packed = native.repack(blocks, int(Q.Q8_0), 9, 64)
    with pytest.raises(ValueError, match="another build"):
        avx2.parts([packed], 64)
    with pytest.raises(ValueError, match="another build"):
        avx2.stored_rows(packed, torch.tensor([0]))
    assert torch.equal(native.stored_rows(packed, torch.arange(9)), blocks)
    if ymm_vnni():  # the AVX-VNNI build stores Q8_0 as the AVX-512 VNNI one does, and reads its groups
        ymm = kernel_builds.build(load_qlinear, "avxvnni", tmp_path_factory)
        x = _x(3, 64, seed=1)
        assert ymm.x8_layout == native.x8_layout
        got = ymm.stacked(x, ymm.parts([packed], 64))
        assert torch.equal(got, native.stacked(x, native.parts([packed], 64)))


def test_repacked_and_stored_parts_stack(kernel: QuantLinearKernel) -> None:
    """A fused projection may mix layouts (the kernel takes both): each part's columns are the bits it
    gives alone, a partial group's lanes never spill into the next part's."""
    k = 96
    q8, q4 = _blocks(Q.Q8_0, 13, k), _blocks(Q.Q4_1, 5, k, seed=3)
    a, b = kernel.repack(q8, int(Q.Q8_0), 13, k), kernel.repack(q4, int(Q.Q4_1), 5, k)
    x = _x(6, k)
    got = kernel.stacked(x, kernel.parts([a, (q8, int(Q.Q8_0), 13), b], k))
    assert got.shape == (6, 31)
    assert torch.equal(got[:, :13], kernel.stacked(x, kernel.parts([a], k)))
    assert torch.equal(got[:, 13:26], kernel(x, q8, int(Q.Q8_0), 13, k))
    assert torch.equal(got[:, 26:], kernel.stacked(x, kernel.parts([b], k)))


def test_refuses_what_it_cannot_repack(kernel: QuantLinearKernel) -> None:
    blocks = _blocks(Q.Q8_0, 9, 64)
    with pytest.raises(ValueError, match="takes GGML types"):  # Q5_0: no kernel reads it
        kernel.repack(torch.zeros(9, 2 * 22, dtype=torch.uint8), int(Q.Q5_0), 9, 64)
    with pytest.raises(ValueError, match="row order"):
        kernel.repack(blocks, int(Q.Q8_0), 9, 64, torch.arange(8))
    with pytest.raises(ValueError, match="out of range"):
        kernel.repack(blocks, int(Q.Q8_0), 9, 64, torch.arange(9) + 1)
    packed = kernel.repack(blocks, int(Q.Q8_0), 9, 64)
    with pytest.raises(IndexError):
        kernel.stored_rows(packed, torch.tensor([9]))
    with pytest.raises(ValueError, match="input features"):
        kernel.parts([Repacked(packed.data, packed.qtype, 9, 32, packed.layout)], 64)


def test_the_avx_vnni_build_for_cpus_without_avx512(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built as for an AVX-VNNI CPU without AVX-512 (Intel's client cores since Alder Lake, its E-core Xeons:
    -mno-avx512f -mavxvnni), the kernel takes the VEX-encoded vpdpbusd path and its Q8_0 layout. Its dots run
    here only on such a CPU; the same code runs on AVX-512 VNNI CPUs through the EVEX encoding (the
    `avxvnni` build of the other tests)."""
    k = kernel_builds.build(load_qlinear, "avxvnni", tmp_path_factory, "-mno-avx512f -mavxvnni")
    assert (k.vector_bits, k.vnni, k.x8_layout) == (256, True, 0x80)
    if kernel_builds.cpu_has("avx_vnni"):
        avx2 = kernel_builds.build(load_qlinear, "avx2", tmp_path_factory, "-mno-avx512f -mno-avxvnni")
        for qtype in TYPES:
            k_in = _k(qtype, 256)
            blocks, x = _blocks(qtype, 24, k_in), _x(5, k_in, seed=2)
            got = k.stacked(x, k.parts([k.repack(blocks, int(qtype), 24, k_in)], k_in))
            want = avx2.stacked(x, avx2.parts([avx2.repack(blocks, int(qtype), 24, k_in)], k_in))
            assert torch.equal(got, want)

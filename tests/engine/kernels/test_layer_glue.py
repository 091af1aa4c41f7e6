"""The fused layer kernels (csrc/layer_glue.c: residual add + RMSNorm, RoPE + the KV cache write, the MLP's
activation times up) against torch's operators, in each build that differs on this CPU (kernel_builds)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loraserve.engine.kernels import build as kernel_build
from loraserve.engine.kernels.layer_glue import LayerGlue, load_layer_glue
from loraserve.engine.ops.glue import Activation, KernelGlue, TorchGlue, apply_rope

import kernel_builds

if kernel_build.compiler() is None:
    pytest.skip("no C compiler on this machine: the engine runs torch's operators", allow_module_level=True)


@pytest.fixture(scope="module", params=kernel_builds.builds())
def glue(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LayerGlue:
    return kernel_builds.build(load_layer_glue, request.param, tmp_path_factory)


@pytest.mark.parametrize("rows", [1, 5, 70])  # 70: past the kernel's one-thread limit of 64 rows
def test_add_rms_norm_matches_torch(glue: LayerGlue, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    h, delta, w = (torch.randn(rows, 72, generator=g), torch.randn(rows, 72, generator=g),
                   torch.randn(72, generator=g))
    want_h = h + delta
    want = F.rms_norm(want_h, (72,), w, 1e-5)
    torch.testing.assert_close(glue.add_rms_norm(h, delta, w, 1e-5), want)
    torch.testing.assert_close(h, want_h)  # the residual was added in place
    torch.testing.assert_close(glue.add_rms_norm(h, None, w, 1e-5), want)
    assert torch.equal(glue.add_rms_norm(h[-1:], None, w, 1e-5)[0], glue.add_rms_norm(h, None, w, 1e-5)[-1])


@pytest.mark.parametrize(("rows", "hq", "hkv", "d"), [(1, 9, 3, 64), (3, 4, 2, 16), (70, 4, 4, 8)])
def test_rope_store_matches_torch_rope_and_index_copy(glue: LayerGlue, rows: int, hq: int, hkv: int,
                                                      d: int) -> None:
    g = torch.Generator().manual_seed(rows)
    cos, sin = torch.randn(100, d, generator=g), torch.randn(100, d, generator=g)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d + 5, generator=g)[:, 5:]  # rows further apart than their width
    pos = torch.randint(0, 100, (rows,), generator=g)
    slots = torch.randperm(rows + 7, generator=g)[:rows]
    kc, vc = torch.zeros(rows + 7, hkv, d), torch.zeros(rows + 7, hkv, d)
    q = glue.rope_store(qkv, hq, hkv, cos, sin, pos, slots, kc, vc)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    torch.testing.assert_close(q, apply_rope(qkv[:, :hq * d].reshape(rows, hq, d), c, s))
    torch.testing.assert_close(kc[slots],
                               apply_rope(qkv[:, hq * d:(hq + hkv) * d].reshape(rows, hkv, d), c, s))
    assert torch.equal(vc[slots], qkv[:, (hq + hkv) * d:].reshape(rows, hkv, d))
    untouched = torch.ones(rows + 7, dtype=torch.bool)
    untouched[slots] = False
    assert not kc[untouched].any() and not vc[untouched].any()


@pytest.mark.parametrize(("rows", "hkv", "d"), [(1, 32, 128), (3, 2, 16), (70, 3, 64)])
def test_rope_store_into_a_float16_cache_rounds_what_a_float32_one_holds(glue: LayerGlue, rows: int, hkv: int,
                                                                         d: int) -> None:
    """A float16 KV cache gets the float32 cache's values rounded to nearest even (torch's .half()), bit for
    bit; q is the float32 one's."""
    g = torch.Generator().manual_seed(rows)
    cos, sin = torch.randn(100, d, generator=g), torch.randn(100, d, generator=g)
    qkv = torch.randn(rows, (4 + 2 * hkv) * d, generator=g) * 100  # values float16 rounds differently apart
    pos = torch.randint(0, 100, (rows,), generator=g)
    slots = torch.randperm(rows + 7, generator=g)[:rows]
    kc, vc = torch.zeros(rows + 7, hkv, d), torch.zeros(rows + 7, hkv, d)
    kh, vh = kc.half(), vc.half()
    q = glue.rope_store(qkv, 4, hkv, cos, sin, pos, slots, kc, vc)
    assert torch.equal(glue.rope_store(qkv, 4, hkv, cos, sin, pos, slots, kh, vh), q)
    assert torch.equal(kh, kc.half()) and torch.equal(vh, vc.half())


def _gate_up(rows: int) -> torch.Tensor:
    """[rows, 80] of gate | up, rows further apart than their width, with the activations' far tails."""
    g = torch.Generator().manual_seed(rows)
    gu = torch.randn(rows, 2 * 40 + 3, generator=g)[:, 3:] * 6
    gu[0, :8] = torch.tensor([-100.0, 100.0, 0.0, -1e-30, -9.0, -10.5, 30.0, 3e4])
    return gu


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_silu_mul_matches_torch(glue: LayerGlue, rows: int) -> None:
    gu = _gate_up(rows)  # far tails: silu -> 0 and -> g, no overflow
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(glue.silu_mul(gu), F.silu(gate) * up)
    assert torch.equal(glue.silu_mul(gu[-1:])[0], glue.silu_mul(gu)[-1])


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_gelu_tanh_mul_matches_torch(glue: LayerGlue, rows: int) -> None:
    """Against torch's float32 GELU (tanh approximation) within float32's tolerance, and closer than that
    against the same function in float64, written as x / 2 (1 + tanh(z)) = x sigmoid(2 z): torch's
    1 + tanh cancels to 0 in the negative tail (in float64 too), the kernel's sigmoid form does not (what
    is left there is float32's rounding of the exp's argument)."""
    gu = _gate_up(rows)
    gate, up = gu.chunk(2, dim=-1)
    got = glue.gelu_tanh_mul(gu)
    torch.testing.assert_close(got, F.gelu(gate, approximate="tanh") * up)
    x = gate.double()
    exact = x * torch.sigmoid(2 * (2 / math.pi) ** 0.5 * (x + 0.044715 * x ** 3)) * up.double()
    torch.testing.assert_close(got.double(), exact, rtol=2e-5, atol=1e-30)
    assert torch.equal(glue.gelu_tanh_mul(gu[-1:])[0], got[-1])


@pytest.mark.parametrize("act", list(Activation))
def test_kernel_glue_activations_are_torch_glue_s(glue: LayerGlue, act: Activation) -> None:
    gu = _gate_up(5)
    torch.testing.assert_close(KernelGlue(glue).act_mul(gu, act), TorchGlue().act_mul(gu, act))


def test_layer_glue_refuses_what_it_cannot_read(glue: LayerGlue) -> None:
    h, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="float32"):
        glue.add_rms_norm(h.double(), None, w, 1e-5)
    with pytest.raises(ValueError, match="shapes"):
        glue.add_rms_norm(h, torch.randn(3, 8), w, 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        glue.silu_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="gelu_tanh_mul"):
        glue.gelu_tanh_mul(torch.randn(2, 8).double())
    cos = torch.randn(10, 4)
    kc = torch.zeros(4, 1, 4)
    with pytest.raises(ValueError, match="qkv"):
        glue.rope_store(torch.randn(2, 11), 1, 1, cos, cos, torch.zeros(2, dtype=torch.long),
                        torch.zeros(2, dtype=torch.long), kc, kc)
    with pytest.raises(ValueError, match="slots"):
        glue.rope_store(torch.randn(2, 12), 1, 1, cos, cos, torch.zeros(2, dtype=torch.long),
                        torch.zeros(2, dtype=torch.int32), kc, kc)
    with pytest.raises(ValueError, match="caches"):
        glue.rope_store(torch.randn(2, 12), 1, 1, cos, cos, torch.zeros(2, dtype=torch.long),
                        torch.zeros(2, dtype=torch.long), kc, torch.zeros(4, 1, 8)[:, :, ::2])
    for k, v in ((kc, kc.half()), (kc.double(), kc.double()), (kc.bfloat16(), kc.bfloat16())):
        with pytest.raises(ValueError, match="caches"):  # one dtype, float32 or float16
            glue.rope_store(torch.randn(2, 12), 1, 1, cos, cos, torch.zeros(2, dtype=torch.long),
                            torch.zeros(2, dtype=torch.long), k, v)
    qkv = torch.randn(2, 12)
    for pos, slot in (([0, 10], [0, 1]), ([0, -1], [0, 1]), ([0, 1], [4, 0]), ([0, 1], [0, -1])):
        with pytest.raises(IndexError, match="outside"):
            glue.rope_store(qkv, 1, 1, cos, cos, torch.tensor(pos), torch.tensor(slot), kc, kc)
    assert not kc.any()  # nothing was written, not even the valid rows


@pytest.mark.parametrize("rows, vocab", [(1, 1), (1, 63), (3, 64), (5, 200), (32, 4099)])
def test_argmax_is_torch_s(glue: LayerGlue, rows: int, vocab: int) -> None:
    torch.manual_seed(rows * vocab)
    x = torch.randn(rows, vocab)
    assert torch.equal(glue.argmax(x), x.argmax(dim=-1))
    # ties go to the first index, wherever they lie against the kernel's 64-element chunks
    x = torch.zeros(rows, vocab)
    for r in range(rows):
        x[r, (r * 37) % vocab:] = 1.0
    assert torch.equal(glue.argmax(x), x.argmax(dim=-1))
    # every row at the row-parallel size: threads share the rows
    big = torch.randn(4, 40000)
    assert torch.equal(glue.argmax(big), big.argmax(dim=-1))


def test_argmax_of_nan_and_infinite_rows_is_torch_s(glue: LayerGlue) -> None:
    x = torch.randn(5, 130)
    x[0, 70] = float("nan")
    x[0, 100] = float("nan")  # the first NaN counts
    x[1] = float("-inf")  # all -inf: index 0
    x[2, 3] = float("inf")
    x[2, 129] = float("inf")
    x[3, :] = float("nan")
    x[4, 129] = float("nan")  # the last element, past the last whole chunk
    assert torch.equal(glue.argmax(x), x.argmax(dim=-1))


def test_argmax_reads_strided_rows_and_refuses_what_it_cannot(glue: LayerGlue) -> None:
    wide = torch.randn(6, 300)
    rows = wide[:, 10:210]  # rows 300 apart
    assert torch.equal(glue.argmax(rows), rows.argmax(dim=-1))
    assert glue.argmax(torch.empty(0, 5)).shape == (0,)
    for bad in (torch.randn(2, 0), torch.randn(3, 4).double(), torch.randn(4, 3).t(), torch.randn(5)):
        with pytest.raises(ValueError):
            glue.argmax(bad)
    assert torch.equal(KernelGlue(glue).argmax(wide.t()), wide.t().argmax(dim=-1))  # made contiguous

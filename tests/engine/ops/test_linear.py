"""A projection in either weight layout, or through the C kernel, computes the same product for any number
of rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraserve.engine.kernels.cpu import LinearKernel, load_linear
from loraserve.engine.ops.linear import SMALL_ROWS, Layout, PackedLinear, TorchLinear


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS, SMALL_ROWS + 1, 33])
def test_every_layout_gives_f_linear(layout: Layout, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 20, generator=g)  # [out, in]
    x = torch.randn(rows, 20, generator=g)
    proj = TorchLinear.of(w, layout)
    torch.testing.assert_close(proj(x), F.linear(x, w))
    assert proj.out_in().shape == (48, 20)
    torch.testing.assert_close(proj.out_in(), w)


def test_rows_reads_any_layout() -> None:
    w, ids = torch.randn(6, 4), torch.tensor([5, 0, 5])
    for layout in Layout:
        assert torch.equal(TorchLinear.of(w, layout).rows(ids), w[ids])


def test_layouts_keep_what_they_say() -> None:
    w = torch.randn(6, 4)
    assert TorchLinear.of(w, Layout.OUT_IN).wt is None and TorchLinear.of(w, Layout.OUT_IN).w is w
    only_t = TorchLinear.of(w, Layout.IN_OUT)
    assert (only_t.w is None and only_t.wt is not None and only_t.wt.is_contiguous()
            and only_t.wt.shape == (4, 6))
    both = TorchLinear.of(w, Layout.BOTH)
    assert both.w is w and both.wt is not None


def test_a_linear_needs_a_weight() -> None:
    with pytest.raises(ValueError):
        TorchLinear(None, None)


# The C kernel (csrc/linear.c): every CPU float32 projection of the engine when a compiler is at hand.


@pytest.fixture(scope="module")
def kernel() -> LinearKernel:
    k = load_linear()
    if k is None:
        pytest.skip("no C compiler on this machine: projections run on torch's matmul")
    return k


# N = 301 leaves a partial last panel (written through a buffer); rows cover every row count of the
# micro-kernel's blocks (1..8, and more), and 300 two blocks of TBLK = 256 rows; K 5 is shorter than a
# vector, 10000 long.
@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 17, 300])
@pytest.mark.parametrize("k", [576, 1536, 37, 5, 10000])
def test_the_kernel_matches_a_float64_product(kernel: LinearKernel, rows: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows * k)
    w, x = torch.randn(301, k, generator=g), torch.randn(rows, k, generator=g)
    packed = kernel.pack(w)
    assert packed.shape == (-(-301 // kernel.panel), k, kernel.panel)
    atol = 2e-4 if k <= 1536 else 1e-3  # one float32 FMA chain per output: rounding grows with K (~sqrt(K))
    torch.testing.assert_close(kernel(x, packed, 301).double(), x.double() @ w.double().t(), atol=atol,
                               rtol=1e-5)
    wide = torch.randn(rows, k + 9, generator=g)  # rows further apart than K: a view of a wider buffer
    assert torch.equal(kernel(wide[:, 3:3 + k], packed, 301),
                       kernel(wide[:, 3:3 + k].contiguous(), packed, 301))
    assert torch.equal(kernel.unpack(packed, 301), w)


def test_kernel_rows_are_independent_of_each_other_and_of_threads(kernel: LinearKernel) -> None:
    """A row's result is bit-identical alone and in a step of any size, at any thread count: a request's
    output does not depend on what else is in the batch."""
    g = torch.Generator().manual_seed(1)
    packed = kernel.pack(torch.randn(1000, 576, generator=g))
    x = torch.randn(300, 576, generator=g)
    picks = [0, 1, 9, 299]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [kernel(x[i:i + 1], packed, 1000)[0] for i in picks]
        torch.set_num_threads(2)
        together = kernel(x, packed, 1000)
        few = kernel(x[:3], packed, 1000)
    finally:
        torch.set_num_threads(before)
    for i, row in zip(picks, alone, strict=True):
        assert torch.equal(row, together[i])
    assert torch.equal(few, together[:3])


def test_the_kernel_refuses_what_it_cannot_read(kernel: LinearKernel) -> None:
    packed = kernel.pack(torch.randn(8, 6))
    for bad in (torch.randn(2, 6).double(), torch.randn(6, 2).t(), torch.randn(0, 6)):
        with pytest.raises(ValueError, match="rows"):
            kernel(bad, packed, 8)
    with pytest.raises(ValueError, match="shapes"):
        kernel(torch.randn(2, 5), packed, 8)
    with pytest.raises(ValueError, match="shapes"):
        kernel(torch.randn(2, 6), packed, kernel.panel + 1)  # more outputs than the panels hold
    with pytest.raises(ValueError, match="packed weights"):
        PackedLinear(kernel, torch.randn(8, 6), 8)  # the kernel reads packed panels
    with pytest.raises(ValueError, match="packed weights"):
        PackedLinear(kernel, packed, kernel.panel + 1)


@pytest.mark.parametrize("rows", [0, 1, 5, 40])
def test_a_linear_with_the_kernel_gives_f_linear(kernel: LinearKernel, rows: int) -> None:
    """Packed once (no other copy kept); strided columns are made contiguous first; an empty step stays
    empty; rows() reads W's rows back from the panels (a tied embedding's lookup)."""
    w, x = torch.randn(70, 48), torch.randn(rows, 48)
    proj = PackedLinear.of(w, kernel)
    assert proj.packed.data_ptr() % 64 == 0
    torch.testing.assert_close(proj(x), F.linear(x, w))
    strided = torch.randn(48, rows).t()
    torch.testing.assert_close(proj(strided), F.linear(strided, w))
    assert torch.equal(proj.out_in(), w)
    ids = torch.tensor([0, 69, 33, 33])
    assert torch.equal(proj.rows(ids), w[ids])

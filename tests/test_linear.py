"""A projection in either weight layout, or through the C kernel, computes the same product for any number
of rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraserve.engine.cpu_kernels import LinearKernel, load_linear
from loraserve.engine.linear import SMALL_ROWS, Layout, Linear


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("rows", [1, 2, SMALL_ROWS, SMALL_ROWS + 1, 33])
def test_every_layout_gives_f_linear(layout: Layout, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 20, generator=g)  # [out, in]
    x = torch.randn(rows, 20, generator=g)
    proj = Linear.of(w, layout)
    torch.testing.assert_close(proj(x), F.linear(x, w))
    assert proj.out_in().shape == (48, 20)
    torch.testing.assert_close(proj.out_in(), w)


def test_layouts_keep_what_they_say() -> None:
    w = torch.randn(6, 4)
    assert Linear.of(w, Layout.OUT_IN).wt is None and Linear.of(w, Layout.OUT_IN).w is w
    only_t = Linear.of(w, Layout.IN_OUT)
    assert only_t.w is None and only_t.wt is not None and only_t.wt.is_contiguous() and only_t.wt.shape == (4, 6)
    both = Linear.of(w, Layout.BOTH)
    assert both.w is w and both.wt is not None


def test_a_linear_needs_a_weight() -> None:
    with pytest.raises(ValueError):
        Linear(None, None)


# The C kernel (csrc/linear.c): every CPU float32 projection of the engine when a compiler is at hand.


@pytest.fixture(scope="module")
def kernel() -> LinearKernel:
    k = load_linear()
    if k is None:
        pytest.skip("no C compiler on this machine: projections run on torch's matmul")
    return k


# K picks the kernel's group of W rows (16, 6, 2, 1 on AVX-512): 576 and 1536 are SmolLM2's; 37 and 5
# leave a tail after the 16 partial sums; 10000 is one row at a time. N = 301 leaves a partial group.
@pytest.mark.parametrize("rows", [1, 2, 5, 17, 300])  # 300: two blocks of TBLK = 256 rows
@pytest.mark.parametrize("k", [576, 1536, 37, 5, 10000])
def test_the_kernel_matches_a_float64_product(kernel: LinearKernel, rows: int, k: int) -> None:
    if rows > kernel.max_rows:
        pytest.skip(f"this build hands steps over {kernel.max_rows} rows to torch")
    g = torch.Generator().manual_seed(rows * k)
    w, x = torch.randn(301, k, generator=g), torch.randn(rows, k, generator=g)
    torch.testing.assert_close(kernel(x, w).double(), x.double() @ w.double().t(), atol=2e-4, rtol=1e-5)
    wide = torch.randn(rows, k + 9, generator=g)  # rows further apart than K: a view of a wider buffer
    assert torch.equal(kernel(wide[:, 3:3 + k], w), kernel(wide[:, 3:3 + k].contiguous(), w))


def test_kernel_rows_are_independent_of_each_other_and_of_threads(kernel: LinearKernel) -> None:
    """A row's result is bit-identical alone and in a step of any size, at any thread count: a request's
    output does not depend on what else is in the batch."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 576, generator=g)
    x = torch.randn(min(300, kernel.max_rows), 576, generator=g)
    picks = [0, 1, x.shape[0] - 1]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [kernel(x[i:i + 1], w)[0] for i in picks]
        torch.set_num_threads(2)
        together = kernel(x, w)
        few = kernel(x[:3], w)
    finally:
        torch.set_num_threads(before)
    for i, row in zip(picks, alone, strict=True):
        assert torch.equal(row, together[i])
    assert torch.equal(few, together[:3])


def test_the_kernel_refuses_what_it_cannot_read(kernel: LinearKernel) -> None:
    w = torch.randn(8, 6)
    for bad in (torch.randn(2, 6).double(), torch.randn(6, 2).t(), torch.randn(0, 6)):
        with pytest.raises(ValueError, match="rows"):
            kernel(bad, w)
    with pytest.raises(ValueError, match="shapes"):
        kernel(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="linear kernel"):
        Linear(None, torch.randn(6, 8), kernel)  # the kernel reads [out, in]


@pytest.mark.parametrize("rows", [0, 1, 5, 40])
def test_a_linear_with_the_kernel_gives_f_linear(kernel: LinearKernel, rows: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel up to its max_rows, torch beyond (forced here at 4 rows), torch for strided columns; an
    empty step stays empty. The weight is copied into aligned memory of its own."""
    w, x = torch.randn(64, 48), torch.randn(rows, 48)
    proj = Linear.of(w[:, :], Layout.OUT_IN, kernel)
    assert proj.w is not None and proj.w.data_ptr() != w.data_ptr() and proj.w.data_ptr() % 64 == 0
    torch.testing.assert_close(proj(x), F.linear(x, w))
    strided = torch.randn(48, rows).t()
    torch.testing.assert_close(proj(strided), F.linear(strided, w))
    monkeypatch.setattr(kernel, "max_rows", 4)
    torch.testing.assert_close(proj(x), F.linear(x, w))

"""A projection in either weight layout computes the same product for any number of rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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

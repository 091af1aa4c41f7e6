"""QuantLinear: a quantized projection's parts repacked for the kernel, their sources let go."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from loraserve.engine.kernels.qlinear import Repacked, load_qlinear
from loraserve.engine.ops.quant_linear import QuantLinear
from loraserve.engine.weights.quant import QuantStack, QuantType, random_blocks

KERNEL = load_qlinear()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler: no quantized kernel")


def test_parts_are_repacked_and_their_sources_freed() -> None:
    """A 7B's blocks must not be held twice (the file's or a quantized copy, and the repacked ones)."""
    assert KERNEL is not None
    rng = np.random.default_rng(0)
    q, v = random_blocks(24, 64, QuantType.Q4_0, 0.1, rng), random_blocks(9, 64, QuantType.Q8_0, 0.1, rng)
    stacked = QuantStack((q, v))
    want = stacked.dequantize()
    x = torch.randn(5, 64)
    stored = KERNEL.stacked(x, KERNEL.parts([(p.blocks, int(p.qtype), p.out_features) for p in (q, v)], 64))
    proj = QuantLinear.of(KERNEL, stacked)
    assert all(isinstance(p, Repacked) for p in proj.layout)
    assert proj.qtypes == (QuantType.Q4_0, QuantType.Q8_0)
    gone = weakref.ref(q.blocks)
    del q, v, stacked
    gc.collect()
    assert gone() is None
    assert torch.equal(proj.out_in(), want)
    torch.testing.assert_close(proj(x), stored, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="fused"):
        proj.rows(torch.tensor([0]))


def test_rows_of_a_repacked_embedding() -> None:
    assert KERNEL is not None
    embed = random_blocks(50, 96, QuantType.Q8_0, 0.1, np.random.default_rng(1))
    want = embed.dequantize()
    proj = QuantLinear.of(KERNEL, embed)
    ids = torch.tensor([49, 0, 7, 7])
    assert torch.equal(proj.rows(ids), want[ids])

"""Every attention backend against an explicit float64 reference (scores, cap, mask and softmax written out),
for each option a layer may set: its scale, logit soft-capping, a sliding window. The backends: the paged C
kernel in each of its builds (kernel_builds), gather + SDPA, and the device backend's math on CPU tensors
(`DeviceAttention` is device-generic torch code). One step mixes decodes and prefill chunks (a fresh
prompt, chunks after a cached prefix), planned by the backends' own `plan`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.core.scheduler import ScheduledSeq
from loraserve.engine.core.sequence import Sequence
from loraserve.engine.kernels import build as kernel_build
from loraserve.engine.kernels.cpu import load_paged_attention
from loraserve.engine.ops.attention import (
    Attention,
    DeviceAttention,
    GatherAttention,
    GatheredRows,
    LayerAttention,
    PagedAttention,
    StepLayout,
    decode_gather,
    in_window,
)
from loraserve.types import SamplingParams

import kernel_builds

CPU = torch.device("cpu")
# (cached positions, new tokens) per sequence: decodes of contexts 1, 17, 40 and 8, then a fresh 13-token
# prompt, a 9-token chunk after 20 cached positions, a 30-token one after 3
CHUNKS = [(0, 1), (16, 1), (39, 1), (7, 1), (0, 13), (20, 9), (3, 30)]


def _cfg(hq: int, hkv: int, d: int) -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=hq * d, intermediate_size=8, num_layers=1, num_heads=hq,
                       num_kv_heads=hkv, head_dim=d)


@dataclass
class Step:
    cfg: ModelConfig
    layout: StepLayout
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [slots, Hkv, D]
    v_cache: torch.Tensor
    contexts: list[torch.Tensor]  # per row: the flat slots of its context, its own token's last


def _step(hq: int, hkv: int, d: int, bs: int, chunks: list[tuple[int, int]], q_scale: float = 1.0,
          seed: int = 0) -> Step:
    """Sequences over blocks scattered in the cache, out of order; the scratch slot is the cache's last."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-(cached + new) // bs) for cached, new in chunks]
    num_blocks = sum(widths) + 3
    blocks = torch.randperm(num_blocks, generator=g).tolist()
    order, contexts, positions = [], [], []
    for i, ((cached, new), width) in enumerate(zip(chunks, widths, strict=True)):
        seq = Sequence(f"r{i}", list(range(1, cached + new + 1)), SamplingParams())
        seq.num_computed, seq.block_table = cached, blocks[:width]
        blocks = blocks[width:]
        order.append(ScheduledSeq(seq, new))
        table = torch.tensor(seq.block_table)
        for p in range(cached, cached + new):
            pos = torch.arange(p + 1)
            contexts.append(table[pos // bs] * bs + pos % bs)
        positions.append(torch.arange(cached, cached + new))
    num_decode = sum(1 for _, new in chunks if new == 1)
    assert all(new == 1 for _, new in chunks[:num_decode])  # decodes first, as the runner orders them
    slots = num_blocks * bs + 1
    layout = StepLayout(order, num_decode, torch.cat(positions), bs, slots - 1, CPU)
    return Step(_cfg(hq, hkv, d), layout, torch.randn(len(contexts), hq, d, generator=g) * q_scale,
                torch.randn(slots, hkv, d, generator=g), torch.randn(slots, hkv, d, generator=g), contexts)


def _reference(step: Step, layer: LayerAttention) -> torch.Tensor:
    """[T, Hq * D] in float64: per row, scores = scale * q.k over its whole context, capped, positions
    j <= p - window masked out (p: the row's position), softmax, times V."""
    out = []
    group = step.cfg.num_heads // step.cfg.num_kv_heads
    for q, slots in zip(step.q.double(), step.contexts, strict=True):
        n = len(slots)
        k = step.k_cache[slots].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = step.v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = (k * q).sum(-1).T * layer.scale  # [Hq, n]
        if layer.softcap is not None:
            scores = layer.softcap * torch.tanh(scores / layer.softcap)
        if layer.window is not None:
            scores = scores.masked_fill(torch.arange(n) <= (n - 1) - layer.window, float("-inf"))
        out.append((scores.softmax(dim=-1).T.unsqueeze(-1) * v).sum(0).reshape(-1))  # [Hq * D]
    return torch.stack(out)


def _backends() -> list[str]:
    paged = [f"paged-{b}" for b in kernel_builds.builds()] if kernel_build.compiler() else []
    return [*paged, "gather", "device"]


@pytest.fixture(scope="module", params=_backends())
def backend(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[ModelConfig], Attention]:
    name: str = request.param
    if name.startswith("paged-"):
        kernel = kernel_builds.build(load_paged_attention, name.removeprefix("paged-"), tmp_path_factory)
        return lambda cfg: PagedAttention(cfg, kernel)
    return GatherAttention if name == "gather" else DeviceAttention


SHAPES = [
    (6, 2, 16, 4),  # GQA groups of 3, blocks of 4: the kernel's generic path, no score tiles
    (9, 3, 64, 16),  # SmolLM2's heads, a shape the kernel specialises, full score tiles
    (4, 4, 32, 8),  # no GQA, blocks of 8: AVX2 tiles, none for AVX-512's 16
    (40, 20, 64, 4),  # rows of 1280 floats, which the kernel reads whole; a partial tile of heads
]
# (scale, softcap, window, q multiplier), scale None: head_dim ** -0.5. Windows shorter and longer than
# the contexts, crossing block edges, of one token; caps that bite (scores of a few units against a cap of
# 2) and Gemma 2's; the scales of other heads.
OPTIONS: list[tuple[float | None, float | None, int | None, float]] = [
    (None, None, None, 1.0),
    (None, None, 5, 1.0),
    (None, None, 17, 1.0),
    (None, None, 1, 1.0),
    (None, None, 1000, 1.0),
    (None, 2.0, None, 3.0),
    (0.3, 50.0, 9, 2.0),
    (0.05, None, None, 1.0),
    (0.2, 5.0, 12, 4.0),
]


@pytest.mark.parametrize(("hq", "hkv", "d", "bs"), SHAPES)
@pytest.mark.parametrize(("scale", "softcap", "window", "q_scale"), OPTIONS)
def test_matches_the_explicit_reference(backend: Callable[[ModelConfig], Attention], hq: int, hkv: int,
                                        d: int, bs: int, scale: float | None, softcap: float | None,
                                        window: int | None, q_scale: float) -> None:
    step = _step(hq, hkv, d, bs, CHUNKS, q_scale)
    layer = LayerAttention(d ** -0.5 if scale is None else scale, softcap, window)
    attention = backend(step.cfg)
    got = attention(step.q, step.k_cache, step.v_cache, attention.plan(step.layout), layer)
    assert got.shape == (len(step.contexts), hq * d)
    torch.testing.assert_close(got.double(), _reference(step, layer), atol=2e-5, rtol=1e-4)


def test_options_change_the_result() -> None:
    """The reference is not blind to them: each option moves some row (a window: the rows past it)."""
    step = _step(6, 2, 16, 4, CHUNKS, 3.0)
    plain = _reference(step, LayerAttention(0.25))
    for other in (LayerAttention(0.2), LayerAttention(0.25, softcap=2.0), LayerAttention(0.25, window=5)):
        moved = (_reference(step, other) - plain).abs().amax(dim=-1) > 1e-3
        lens = torch.tensor([len(c) for c in step.contexts])
        assert moved.any() and (other.window is None or torch.equal(moved, lens > other.window))


@pytest.mark.parametrize(("softcap", "window"), [(None, 20), (3.0, 7)])
def test_device_decode_padded_as_a_cuda_graph_runs_it(softcap: float | None, window: int) -> None:
    """A graph's decode step: rows padded to a batch size, contexts to a length bucket, padding rows
    attending to the scratch slot alone (model_runner.decode_inputs); the window's mask comes from that
    mask by torch operators."""
    step = _step(6, 2, 16, 4, CHUNKS[:4], 2.0)
    layer = LayerAttention(0.25, softcap, window)
    seqs = [s.seq for s in step.layout.order]
    batch, length, n = 8, 64, len(seqs)
    gather = torch.full((batch, length), step.layout.scratch_slot)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    gather[:n], mask[:n] = decode_gather(seqs, length, 4, step.layout.scratch_slot)
    mask[n:, 0] = True
    q = torch.cat([step.q, torch.randn(batch - n, 6, 16)])
    plan = GatheredRows(batch, gather, mask.view(batch, 1, 1, length), [])
    got = DeviceAttention(step.cfg)(q, step.k_cache, step.v_cache, plan, layer)
    torch.testing.assert_close(got[:n].double(), _reference(step, layer), atol=2e-5, rtol=1e-4)
    assert got.isfinite().all()


def test_in_window_keeps_each_row_s_last_positions() -> None:
    lens = torch.tensor([1, 3, 6, 9])
    mask = torch.arange(9) < lens.unsqueeze(1)  # [4, 9] prefixes
    want = mask & (torch.arange(9) >= lens.unsqueeze(1) - 4)
    assert torch.equal(in_window(mask, 4), want)
    assert torch.equal(in_window(mask.view(4, 1, 1, 9), 4), want.view(4, 1, 1, 9))
    assert in_window(mask, None) is mask
    assert torch.equal(in_window(mask, 100), mask)


def test_a_layer_s_options_come_from_the_config() -> None:
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=8, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=16, query_pre_attn_scalar=64.0, attn_logit_softcapping=50.0,
                      sliding_window=4, sliding_layers=(True, False, True))
    assert LayerAttention.of_layer(cfg, 0) == LayerAttention(0.125, 50.0, 4)
    assert LayerAttention.of_layer(cfg, 1) == LayerAttention(0.125, 50.0, None)
    assert LayerAttention.of_layer(_cfg(4, 2, 16), 0) == LayerAttention(0.25)
    for scale, softcap, window in ((0.0, None, None), (0.1, 0.0, None), (0.1, None, 0)):
        with pytest.raises(ValueError, match="invalid attention options"):
            LayerAttention(scale, softcap, window)

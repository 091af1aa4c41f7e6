"""The paged decode attention C kernel against torch's attention over gathered K/V, in each build that differs
on this CPU (kernel_builds: native, AVX2, scalar); the kernels' build cache and fallback (the fused layer
kernels have their tests in test_layer_glue.py, the LoRA kernel in test_lora_sgmv.py, the projection
kernel in test_linear.py). The attention options a layer may set (scale, soft-cap, window) are compared
with an explicit reference, through every attention backend, in tests/engine/ops/test_attention.py; here,
what is the kernel's own: which blocks it reads, its thread split and its bits."""

from __future__ import annotations

import ctypes
import logging
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraserve.engine.kernels import build as kernel_build
from loraserve.engine.kernels import huge_pages
from loraserve.engine.kernels.build import build
from loraserve.engine.kernels.cpu import (
    PagedAttention,
    load_linear,
    load_lora_sgmv,
    load_paged_attention,
)
from loraserve.engine.kernels.layer_glue import load_layer_glue
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.sgmv import SgmvLora
from loraserve.engine.ops.attention import GatherAttention
from loraserve.engine.ops.attention import PagedAttention as PagedAttentionOp
from loraserve.engine.ops.glue import KernelGlue, TorchGlue
from loraserve.engine.ops.linear import MklProjections, PackedProjections
from loraserve.engine.ops.quant_linear import QuantProjections
from loraserve.engine.ops.select import Ops

import kernel_builds
from engine_helpers import build_engine, hf_model

if kernel_build.compiler() is None:
    pytest.skip("no C compiler on this machine: the engine runs torch's attention path",
                allow_module_level=True)


@pytest.fixture(scope="module", params=kernel_builds.builds())
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PagedAttention:
    k = kernel_builds.build(load_paged_attention, request.param, tmp_path_factory)
    assert k.tile == kernel_builds.tile(request.param)  # the build has the path it is named for
    return k


def _case(b: int, hq: int, hkv: int, d: int, bs: int, lens: list[int],
          seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens) + 1  # one spare column: tables are wider than some sequences need
    num_blocks = b * width + 3
    blocks = torch.randperm(num_blocks, generator=g)[:b * width].view(b, width)  # scattered, out of order
    return dict(
        q=torch.randn(b, hq, d, generator=g),
        k=torch.randn(num_blocks * bs, hkv, d, generator=g),
        v=torch.randn(num_blocks * bs, hkv, d, generator=g),
        tables=blocks.contiguous(),
        lens=torch.tensor(lens, dtype=torch.long),
    )


def _reference(c: dict[str, torch.Tensor], bs: int, window: int | None = None) -> torch.Tensor:
    """Per sequence, in float64: gather its context through the block table, plain softmax attention (over
    the last `window` positions where given)."""
    outs = []
    for i, n in enumerate(c["lens"].tolist()):
        pos = torch.arange(n)
        slots = c["tables"][i, pos // bs] * bs + pos % bs
        k, v = c["k"][slots].double().transpose(0, 1), c["v"][slots].double().transpose(0, 1)  # [Hkv, n, D]
        q = c["q"][i].double().unsqueeze(1)  # [Hq, 1, D]
        mask = pos >= n - window if window is not None else None
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).squeeze(1))
    return torch.stack(outs).float()  # [B, Hq, D]


def _run(kernel: PagedAttention, c: dict[str, torch.Tensor], bs: int, softcap: float | None = None,
         window: int | None = None) -> torch.Tensor:
    out = torch.empty_like(c["q"])
    kernel(c["q"], c["k"], c["v"], c["tables"], c["lens"], bs, out, scale=c["q"].shape[-1] ** -0.5,
           softcap=softcap, window=window)
    return out


@pytest.mark.parametrize(("hq", "hkv", "d", "bs", "lens"), [
    (9, 3, 64, 16, [1, 16, 17, 100, 5]),  # SmolLM2's heads; block edges
    (4, 4, 32, 4, [3, 8, 9]),  # no GQA
    (8, 1, 128, 16, [40]),  # one KV head, Llama-sized head dim, a single sequence
    (6, 2, 16, 1, [7, 1, 12, 2, 2, 30, 9, 4]),  # blocks of one token
    (4, 4, 128, 16, [33, 2]),  # Llama-2-7B's shape (no GQA, D 128): a specialised path in the kernel
    (8, 2, 128, 16, [20, 47]),  # Mistral-7B's groups of 4 (D 128): another
    (9, 3, 64, 32, [31, 32, 33, 70]),  # blocks of 32: two 16-row score tiles each
    # Rows of >= 1024 floats are read whole, all heads a position (attend_wide):
    (32, 32, 128, 16, [1, 16, 17, 100, 5]),  # Llama-2-7B's heads, its specialised path
    (32, 8, 128, 16, [33, 2]),  # Mistral-7B's, its specialised path
    (20, 20, 64, 4, [3, 9, 40]),  # the general one; 20 heads: a tile of 16 and a partial one
    (24, 12, 128, 1, [7, 1, 12]),  # blocks of one token, two query heads a KV head
])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_matches_attention_over_gathered_kv(kernel: PagedAttention, hq: int, hkv: int, d: int, bs: int,
                                            lens: list[int], kv_dtype: torch.dtype) -> None:
    """A float16 cache against the reference on its own values: the kernel widens each one exactly and sums
    in float32, so the tolerance is float32's."""
    c = _case(len(lens), hq, hkv, d, bs, lens)
    c["k"], c["v"] = c["k"].to(kv_dtype), c["v"].to(kv_dtype)
    torch.testing.assert_close(_run(kernel, c, bs), _reference(c, bs), atol=2e-5, rtol=1e-4)


# The two ways rows are read: a head at a time (SmolLM2's 3 x 64 floats a row), rows whole (32 x 128)
HEADS = [(9, 3, 64), (32, 8, 128)]


@pytest.mark.parametrize(("hq", "hkv", "d"), HEADS)
def test_prefill_rows_by_length_are_causal_attention(kernel: PagedAttention, hq: int, hkv: int,
                                                     d: int) -> None:
    """The engine hands a prefill chunk's tokens over as rows of one sequence with growing lengths: that
    is causal attention over the sequence's cached prefix and the chunk."""
    c = _case(1, hq, hkv, d, 16, [40], seed=9)
    ctx, first = 40, 25  # 25 cached positions, then a 15-token chunk
    n = ctx - first
    g = torch.Generator().manual_seed(4)
    q = torch.randn(n, hq, d, generator=g)
    tables = c["tables"].expand(n, -1).contiguous()
    lens = torch.arange(first + 1, ctx + 1)
    out = torch.empty_like(q)
    kernel(q, c["k"], c["v"], tables, lens, 16, out, scale=d ** -0.5, softcap=None, window=None)
    pos = torch.arange(ctx)
    slots = c["tables"][0][pos // 16] * 16 + pos % 16
    k, v = c["k"][slots].double().transpose(0, 1), c["v"][slots].double().transpose(0, 1)  # [Hkv, ctx, D]
    mask = pos.unsqueeze(0) <= torch.arange(first, ctx).unsqueeze(1)  # [n, ctx]
    want = F.scaled_dot_product_attention(q.double().transpose(0, 1), k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want.transpose(0, 1).float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("hq", "hkv", "d"), HEADS)
def test_peaked_softmax(kernel: PagedAttention, hq: int, hkv: int, d: int) -> None:
    """Scores ~100s apart: the kernel's own exp meets arguments far below -87 (clamped, then ~0)."""
    c = _case(3, hq, hkv, d, 16, [40, 17, 90], seed=5)
    c["q"] *= 30
    torch.testing.assert_close(_run(kernel, c, 16), _reference(c, 16), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("hq", "hkv", "d"), HEADS)
@pytest.mark.parametrize("window", [None, 1100, 300])  # 300: the part left is too short to split
def test_long_context_of_one_sequence_split_across_threads(kernel: PagedAttention, hq: int, hkv: int, d: int,
                                                            window: int | None) -> None:
    """Fewer sequences than threads, long: split by KV head (by 16 query heads where rows are read whole),
    the same bits as on one thread."""
    c = _case(1, hq, hkv, d, 16, [1500])
    if hkv == 8:  # the wide shape's float16 cache: the same split
        c["k"], c["v"] = c["k"].half(), c["v"].half()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_run(kernel, c, 16, window=window))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], _reference(c, 16, window), atol=2e-5, rtol=1e-4)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(("hq", "hkv", "d"), [*HEADS, (20, 20, 64)])
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (5.0, 70)])
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(kernel: PagedAttention, hq: int, hkv: int, d: int,
                                                           softcap: float | None, window: int | None) -> None:
    c = _case(6, hq, hkv, d, 16, [50, 300, 2, 77, 129, 16], seed=3)
    if softcap is not None:  # and a float16 cache
        c["k"], c["v"] = c["k"].half(), c["v"].half()
    batched = _run(kernel, c, 16, softcap, window)
    for i in range(6):
        alone = {k: v[i:i + 1].contiguous() if k in ("q", "tables", "lens") else v for k, v in c.items()}
        assert torch.equal(_run(kernel, alone, 16, softcap, window)[0], batched[i])


@pytest.mark.parametrize(("hq", "hkv", "d"), HEADS)
@pytest.mark.parametrize("bs", [4, 16])
def test_blocks_before_the_window_are_never_read(kernel: PagedAttention, bs: int, hq: int, hkv: int,
                                                 d: int) -> None:
    """A window leaves whole blocks out: their ids are not even checked (a cache that freed them may hold
    anything there), and the result is the window's alone."""
    c = _case(3, hq, hkv, d, bs, [100, 37, 9], seed=6)
    want = _reference(c, bs, window=20)
    torch.testing.assert_close(_run(kernel, c, bs, window=20), want, atol=2e-5, rtol=1e-4)
    tables = c["tables"].clone()
    for row, n in enumerate(c["lens"].tolist()):
        tables[row, :max(0, n - 20) // bs] = -1  # every block wholly before the row's window
    assert (tables == -1).any()
    torch.testing.assert_close(_run(kernel, {**c, "tables": tables}, bs, window=20), want, atol=2e-5,
                               rtol=1e-4)
    tables[0, (100 - 20) // bs] = -1  # the block the window starts in is read
    with pytest.raises(IndexError, match="outside"):
        _run(kernel, {**c, "tables": tables}, bs, window=20)


def test_refuses_options_it_cannot_honour(kernel: PagedAttention) -> None:
    c = _case(2, 4, 2, 32, 4, [5, 6])
    out = torch.empty_like(c["q"])
    for scale, softcap, window in ((0.0, None, None), (-1.0, None, None), (0.5, 0.0, None), (0.5, -3.0, None),
                                   (0.5, None, 0), (0.5, None, -2)):
        with pytest.raises(ValueError, match="invalid"):
            kernel(c["q"], c["k"], c["v"], c["tables"], c["lens"], 4, out, scale=scale, softcap=softcap,
                   window=window)
    for k, v in ((c["k"], c["v"].half()), (c["k"].bfloat16(), c["v"].bfloat16()),
                 (c["k"].double(), c["v"].double())):
        with pytest.raises(ValueError, match="K/V caches"):  # one dtype, float32 or float16
            kernel(c["q"], k, v, c["tables"], c["lens"], 4, out, scale=0.5, softcap=None, window=None)


def test_build_is_cached_and_atomic(tmp_path: Path) -> None:
    cc = kernel_build.compiler()
    assert cc is not None
    source = kernel_build.CSRC / "paged_attention.c"
    lib = build(source, cc, tmp_path)
    mtime = lib.stat().st_mtime_ns
    assert build(source, cc, tmp_path) == lib and lib.stat().st_mtime_ns == mtime
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    with pytest.raises(subprocess.CalledProcessError):
        build(broken, cc, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([lib.name, "broken.c"])  # no partial file


def test_a_changed_header_means_a_new_build(tmp_path: Path) -> None:
    """Sources include csrc/*.h: the cache key covers them, or an edited header would keep a stale build."""
    cc = kernel_build.compiler()
    assert cc is not None
    src = tmp_path / "src"
    src.mkdir()
    (src / "k.c").write_text('#include "v.h"\nint k(void) { return V; }\n')
    libs = []
    for value in (1, 2):
        (src / "v.h").write_text(f"#define V {value}\n")
        libs.append(build(src / "k.c", cc, tmp_path / "cache"))
        assert ctypes.CDLL(str(libs[-1])).k() == value
    assert libs[0] != libs[1]


def test_without_a_working_compiler_the_engine_keeps_torch_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LORASERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    loaders = (load_paged_attention, load_lora_sgmv, load_linear, load_layer_glue, load_qlinear)
    for load in loaders:
        load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="loraserve.engine.kernels.build"):
            assert all(load() is None for load in loaders)
            engine = build_engine(hf_model(seed=1))
        for name in ("paged_attention.c", "lora_sgmv.c", "linear.c", "layer_glue.c", "qlinear.c"):
            assert f"could not build {name}" in caplog.text
        assert engine.ops == Ops(MklProjections(dual=True), engine.ops.attention, engine.ops.glue, GemmLora(),
                              huge_pages.zeros)
        assert type(engine.ops.attention) is GatherAttention and type(engine.ops.glue) is TorchGlue
    finally:
        for load in loaders:
            load.cache_clear()


def test_the_cpu_engine_uses_the_kernels_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loraserve.engine.ops.select"):
        engine = build_engine(hf_model(seed=1))
    qlinear = load_qlinear()
    assert qlinear is not None and f"CPU kernels: quantized dots on {qlinear.instructions}" in caplog.text
    ops = engine.ops
    # GGUF blocks to the quantized kernel, float weights to the packed one
    assert isinstance(ops.projections, QuantProjections)
    assert isinstance(ops.projections.floats, PackedProjections)
    assert isinstance(ops.attention, PagedAttentionOp)
    assert isinstance(ops.glue, KernelGlue) and isinstance(ops.lora, SgmvLora)
    assert engine.adapters.backend is ops.lora
    ops = build_engine(hf_model(seed=1), native_kernels=False).ops
    assert isinstance(ops.projections, MklProjections) and type(ops.attention) is GatherAttention
    assert type(ops.glue) is TorchGlue and isinstance(ops.lora, GemmLora)

"""The paged decode attention C kernel against torch's attention over gathered K/V, the fused layer kernels
against torch's operators; the kernels' build cache and fallback (the LoRA kernel has its tests in
test_lora_sgmv.py, the projection kernel in test_linear.py)."""

from __future__ import annotations

import ctypes
import logging
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraserve.engine.kernels import cpu as cpu_kernels
from loraserve.engine.kernels.cpu import (
    LayerGlue,
    PagedAttention,
    build,
    load_layer_glue,
    load_linear,
    load_lora_sgmv,
    load_paged_attention,
)
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.sgmv import SgmvLora
from loraserve.engine.ops.attention import GatherAttention
from loraserve.engine.ops.attention import PagedAttention as PagedAttentionOp
from loraserve.engine.ops.glue import KernelGlue, TorchGlue, apply_rope
from loraserve.engine.ops.linear import MklProjections, PackedProjections
from loraserve.engine.ops.quant_linear import QuantProjections
from loraserve.engine.ops.select import Ops

from engine_helpers import build_engine, hf_model

if cpu_kernels._compiler() is None:
    pytest.skip("no C compiler on this machine: the engine runs torch's attention path",
                allow_module_level=True)


@pytest.fixture(scope="module")
def kernel() -> PagedAttention:
    k = load_paged_attention()
    assert k is not None  # a compiler is present: the build must work
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


def _reference(c: dict[str, torch.Tensor], bs: int) -> torch.Tensor:
    """Per sequence, in float64: gather its context through the block table, plain softmax attention."""
    outs = []
    for i, n in enumerate(c["lens"].tolist()):
        pos = torch.arange(n)
        slots = c["tables"][i, pos // bs] * bs + pos % bs
        k, v = c["k"][slots].double().transpose(0, 1), c["v"][slots].double().transpose(0, 1)  # [Hkv, n, D]
        q = c["q"][i].double().unsqueeze(1)  # [Hq, 1, D]
        outs.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True).squeeze(1))
    return torch.stack(outs).float()  # [B, Hq, D]


def _run(kernel: PagedAttention, c: dict[str, torch.Tensor], bs: int) -> torch.Tensor:
    out = torch.empty_like(c["q"])
    kernel(c["q"], c["k"], c["v"], c["tables"], c["lens"], bs, out)
    return out


@pytest.mark.parametrize(("hq", "hkv", "d", "bs", "lens"), [
    (9, 3, 64, 16, [1, 16, 17, 100, 5]),  # SmolLM2's heads; block edges
    (4, 4, 32, 4, [3, 8, 9]),  # no GQA
    (8, 1, 128, 16, [40]),  # one KV head, Llama-sized head dim, a single sequence
    (6, 2, 16, 1, [7, 1, 12, 2, 2, 30, 9, 4]),  # blocks of one token
    (4, 4, 128, 16, [33, 2]),  # Llama-2-7B's shape (no GQA, D 128): a specialised path in the kernel
    (8, 2, 128, 16, [20, 47]),  # Mistral-7B's groups of 4 (D 128): another
    (9, 3, 64, 32, [31, 32, 33, 70]),  # blocks of 32: two 16-row score tiles each
])
def test_matches_attention_over_gathered_kv(kernel: PagedAttention, hq: int, hkv: int, d: int, bs: int,
                                            lens: list[int]) -> None:
    c = _case(len(lens), hq, hkv, d, bs, lens)
    torch.testing.assert_close(_run(kernel, c, bs), _reference(c, bs), atol=2e-5, rtol=1e-4)


def test_prefill_rows_by_length_are_causal_attention(kernel: PagedAttention) -> None:
    """The engine hands a prefill chunk's tokens over as rows of one sequence with growing lengths: that
    is causal attention over the sequence's cached prefix and the chunk."""
    c = _case(1, 9, 3, 64, 16, [40], seed=9)
    ctx, first = 40, 25  # 25 cached positions, then a 15-token chunk
    n = ctx - first
    g = torch.Generator().manual_seed(4)
    q = torch.randn(n, 9, 64, generator=g)
    tables = c["tables"].expand(n, -1).contiguous()
    lens = torch.arange(first + 1, ctx + 1)
    out = torch.empty_like(q)
    kernel(q, c["k"], c["v"], tables, lens, 16, out)
    pos = torch.arange(ctx)
    slots = c["tables"][0][pos // 16] * 16 + pos % 16
    k, v = c["k"][slots].double().transpose(0, 1), c["v"][slots].double().transpose(0, 1)  # [Hkv, ctx, D]
    mask = pos.unsqueeze(0) <= torch.arange(first, ctx).unsqueeze(1)  # [n, ctx]
    want = F.scaled_dot_product_attention(q.double().transpose(0, 1), k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want.transpose(0, 1).float(), atol=2e-5, rtol=1e-4)


def test_peaked_softmax(kernel: PagedAttention) -> None:
    """Scores ~100s apart: the kernel's own exp meets arguments far below -87 (clamped, then ~0)."""
    c = _case(3, 9, 3, 64, 16, [40, 17, 90], seed=5)
    c["q"] *= 30
    torch.testing.assert_close(_run(kernel, c, 16), _reference(c, 16), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_context_of_one_sequence_split_across_threads(kernel: PagedAttention, threads: int) -> None:
    c = _case(1, 9, 3, 64, 16, [1500])  # fewer sequences than threads, long: split by KV head
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(_run(kernel, c, 16), _reference(c, 16), atol=2e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(kernel: PagedAttention) -> None:
    c = _case(6, 9, 3, 64, 16, [50, 300, 2, 77, 129, 16], seed=3)
    batched = _run(kernel, c, 16)
    for i in range(6):
        alone = {k: v[i:i + 1].contiguous() if k in ("q", "tables", "lens") else v for k, v in c.items()}
        assert torch.equal(_run(kernel, alone, 16)[0], batched[i])


def test_refuses_tensors_it_cannot_read(kernel: PagedAttention) -> None:
    c = _case(2, 4, 2, 32, 4, [5, 6])
    out = torch.empty_like(c["q"])
    with pytest.raises(ValueError, match="float32"):
        kernel(c["q"].double(), c["k"], c["v"], c["tables"], c["lens"], 4, out)
    with pytest.raises(ValueError, match="float32"):
        kernel(c["q"].transpose(0, 1), c["k"], c["v"], c["tables"], c["lens"], 4, out)
    with pytest.raises(ValueError, match="int64"):
        kernel(c["q"], c["k"], c["v"], c["tables"].int(), c["lens"], 4, out)
    with pytest.raises(ValueError, match="shapes"):
        kernel(c["q"], c["k"], c["v"], c["tables"], c["lens"][:1], 4, out)
    num_blocks = c["k"].shape[0] // 4
    width = c["tables"].shape[1]
    for tables, lens in ((c["tables"], torch.tensor([5, width * 4 + 1])),  # longer than its table
                         (c["tables"], torch.tensor([5, 0])),
                         (torch.full_like(c["tables"], num_blocks), c["lens"]),  # a block past the cache
                         (torch.full_like(c["tables"], -1), c["lens"])):
        with pytest.raises(IndexError, match="outside"):
            kernel(c["q"], c["k"], c["v"], tables, lens, 4, out)


@pytest.fixture(scope="module")
def glue() -> LayerGlue:
    k = load_layer_glue()
    assert k is not None
    return k


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


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_silu_mul_matches_torch(glue: LayerGlue, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    gu = torch.randn(rows, 2 * 40 + 3, generator=g)[:, 3:] * 6  # rows further apart than their width
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-30])  # far tails: silu -> 0 and -> g, no overflow
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(glue.silu_mul(gu), F.silu(gate) * up)
    assert torch.equal(glue.silu_mul(gu[-1:])[0], glue.silu_mul(gu)[-1])


def test_layer_glue_refuses_what_it_cannot_read(glue: LayerGlue) -> None:
    h, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="float32"):
        glue.add_rms_norm(h.double(), None, w, 1e-5)
    with pytest.raises(ValueError, match="shapes"):
        glue.add_rms_norm(h, torch.randn(3, 8), w, 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        glue.silu_mul(torch.randn(2, 7))
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
    qkv = torch.randn(2, 12)
    for pos, slot in (([0, 10], [0, 1]), ([0, -1], [0, 1]), ([0, 1], [4, 0]), ([0, 1], [0, -1])):
        with pytest.raises(IndexError, match="outside"):
            glue.rope_store(qkv, 1, 1, cos, cos, torch.tensor(pos), torch.tensor(slot), kc, kc)
    assert not kc.any()  # nothing was written, not even the valid rows


def test_build_is_cached_and_atomic(tmp_path: Path) -> None:
    cc = cpu_kernels._compiler()
    assert cc is not None
    source = cpu_kernels._CSRC / "paged_attention.c"
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
    cc = cpu_kernels._compiler()
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
        with caplog.at_level(logging.WARNING, logger="loraserve.engine.kernels.cpu"):
            assert all(load() is None for load in loaders)
            engine = build_engine(hf_model(seed=1))
        for name in ("paged_attention.c", "lora_sgmv.c", "linear.c", "layer_glue.c", "qlinear.c"):
            assert f"could not build {name}" in caplog.text
        assert engine.ops == Ops(MklProjections(dual=True), engine.ops.attention, engine.ops.glue, GemmLora())
        assert type(engine.ops.attention) is GatherAttention and type(engine.ops.glue) is TorchGlue
    finally:
        for load in loaders:
            load.cache_clear()


def test_the_cpu_engine_uses_the_kernels_by_default() -> None:
    engine = build_engine(hf_model(seed=1))
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

"""The paged decode attention C kernel against torch's attention over gathered K/V; the kernels' build cache
and fallback (the LoRA kernel has its tests in test_lora_sgmv.py, the projection kernel in test_linear.py)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraserve.engine import cpu_kernels
from loraserve.engine.cpu_kernels import (
    PagedAttention,
    build,
    load_linear,
    load_lora_sgmv,
    load_paged_attention,
)

from engine_helpers import build_engine, hf_model

if cpu_kernels._compiler() is None:
    pytest.skip("no C compiler on this machine: the engine runs torch's attention path", allow_module_level=True)


@pytest.fixture(scope="module")
def kernel() -> PagedAttention:
    k = load_paged_attention()
    assert k is not None  # a compiler is present: the build must work
    return k


def _case(b: int, hq: int, hkv: int, d: int, bs: int, lens: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
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
])
def test_matches_attention_over_gathered_kv(kernel: PagedAttention, hq: int, hkv: int, d: int, bs: int,
                                            lens: list[int]) -> None:
    c = _case(len(lens), hq, hkv, d, bs, lens)
    torch.testing.assert_close(_run(kernel, c, bs), _reference(c, bs), atol=2e-5, rtol=1e-4)


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


def test_without_a_working_compiler_the_engine_keeps_torch_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LORASERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    loaders = (load_paged_attention, load_lora_sgmv, load_linear)
    for load in loaders:
        load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="loraserve.engine.cpu_kernels"):
            assert all(load() is None for load in loaders)
            engine = build_engine(hf_model(seed=1))
        for name in ("paged_attention.c", "lora_sgmv.c", "linear.c"):
            assert f"could not build {name}" in caplog.text
        assert engine.model.paged_attention is None and engine.adapters.sgmv is None
        assert engine.model.lm_head.kernel is None
    finally:
        for load in loaders:
            load.cache_clear()


def test_the_cpu_engine_uses_the_kernels_by_default() -> None:
    engine = build_engine(hf_model(seed=1))
    assert engine.model.paged_attention is not None and engine.adapters.sgmv is not None
    assert engine.model.lm_head.kernel is not None
    engine = build_engine(hf_model(seed=1), native_kernels=False)
    assert engine.model.paged_attention is None and engine.adapters.sgmv is None
    assert engine.model.lm_head.kernel is None

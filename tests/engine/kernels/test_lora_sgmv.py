"""The multi-LoRA C kernel over packed pools against a float64 per-row loop; the packed layout; the plan."""

from __future__ import annotations

import random

import pytest
import torch

from loraserve.engine.config import ModelConfig
from loraserve.engine.kernels import build as kernel_build
from loraserve.engine.kernels.cpu import LoraSgmv, load_lora_sgmv
from loraserve.engine.lora.batch import LoraBatch
from loraserve.engine.lora.gemm import GemmLora
from loraserve.engine.lora.pack import pack_tiles
from loraserve.engine.lora.pool import GROUP_TARGETS, LoraGroup, LoraPool, LoraWeights, group_shape
from loraserve.engine.lora.sgmv import SgmvLora, SgmvPart

import kernel_builds

if kernel_build.compiler() is None:
    pytest.skip("no C compiler on this machine: LoRA runs on torch's GEMMs", allow_module_level=True)

# Awkward sizes on purpose: k/v outputs of 14 and a hidden size of 42 leave partial 16-column tiles and a
# K that is not a multiple of the shrink's 4 partial sums; an intermediate size of 300 spans two expand
# chunks (256 columns) with a partial tile at the end of each target.
CFG = ModelConfig(vocab_size=64, hidden_size=42, intermediate_size=300, num_layers=2, num_heads=3,
                  num_kv_heads=1, head_dim=14)
# down's fan-in past the shrink's parts of 1024 rows of A (summed apart, then in order), its last part 78
# rows (not a multiple of 4 either)
WIDE = ModelConfig(vocab_size=64, hidden_size=42, intermediate_size=1102, num_layers=2, num_heads=3,
                   num_kv_heads=1, head_dim=14)
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=kernel_builds.builds())
def sgmv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoraSgmv:
    return kernel_builds.build(load_lora_sgmv, request.param, tmp_path_factory)


def _weights(key: str, rank: int, targets: list[str], seed: int, cfg: ModelConfig = CFG) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = cfg.lora_shapes()
    return LoraWeights(key, {(layer, t): (torch.randn(rank, shapes[t][0], generator=g),
                                          torch.randn(shapes[t][1], rank, generator=g))
                             for layer in range(cfg.num_layers) for t in targets})


def _pool(sgmv: LoraSgmv | None, bucket: int, ranks: list[int], dtype: torch.dtype = torch.float32,
          cfg: ModelConfig = CFG) -> tuple[LoraPool, list[LoraWeights]]:
    pool = LoraPool(cfg, bucket, len(ranks) + 1, dtype, CPU,
                    SgmvLora(sgmv) if sgmv is not None else GemmLora())
    rng = random.Random(bucket)
    all_targets = list(cfg.lora_shapes())
    ws = []
    for slot, r in enumerate(ranks):
        targets = all_targets if slot % 2 == 0 else rng.sample(all_targets, 3)  # some groups partly empty
        ws.append(_weights(f"a{slot}", r, targets, seed=bucket * 100 + slot, cfg=cfg))
        pool.write(slot, ws[-1])
    return pool, ws


def _reference(ws: list[LoraWeights], slots: list[int | None], layer: int, group: LoraGroup, x: torch.Tensor,
               out: torch.Tensor, cfg: ModelConfig = CFG) -> torch.Tensor:
    shapes = cfg.lora_shapes()
    expected = out.double().clone()
    for row, s in enumerate(slots):
        if s is None:
            continue
        deltas = []
        for t in GROUP_TARGETS[group]:
            pair = ws[s].modules.get((layer, t))
            deltas.append(torch.zeros(shapes[t][1], dtype=torch.float64) if pair is None
                          else pair[1].double() @ (pair[0].double() @ x[row].double()))
        expected[row] += torch.cat(deltas)
    return expected


def _apply(batch: LoraBatch, layer: int, group: LoraGroup, x: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    batch.apply(layer, group, x, out)
    return out


# Segments of 1 to 9 rows (register blocks of 4 rows and the rows left over), interleaved in the batch,
# and rows without an adapter, which must come out untouched.
SLOTS: list[int | None] = [0, 1, None, 0, 2, 3, 3, 0, 1, 3, None, 3, 0, 4, 3, 3, 0, 3, 3, 3, 4, 0, 0]


@pytest.mark.parametrize(("bucket", "ranks"),
                         [(8, [8, 3, 5, 1, 8]), (16, [16, 9, 16, 12, 2]), (64, [64, 33, 40, 64, 7])])
def test_matches_a_per_row_loop(sgmv: LoraSgmv, bucket: int, ranks: list[int]) -> None:
    pool, ws = _pool(sgmv, bucket, ranks)
    batch = LoraBatch.build([None if s is None else (pool, s) for s in SLOTS], CPU)
    assert batch is not None and [type(p) for p in batch.parts] == [SgmvPart]
    g = torch.Generator().manual_seed(bucket)
    for group in LoraGroup:
        fan_in, fan_outs = group_shape(CFG, group)
        for layer in range(CFG.num_layers):
            x = torch.randn(len(SLOTS), fan_in, generator=g)
            out = torch.randn(len(SLOTS), sum(fan_outs), generator=g)
            got = _apply(batch, layer, group, x, out)
            torch.testing.assert_close(got.double(), _reference(ws, SLOTS, layer, group, x, out),
                                       atol=1e-4, rtol=1e-5)
            untouched = [i for i, s in enumerate(SLOTS) if s is None]
            assert torch.equal(got[untouched], out[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_fan_in_past_one_part_of_a(sgmv: LoraSgmv, dtype: torch.dtype) -> None:
    """down's 1102 inputs: the shrink sums A's rows in parts of 1024 and 78, then the parts in order; as
    close to the per-row loop as one sum, alone or in a batch, on 1 or 2 threads (slot 0's 10 rows widen
    their fp16 parts first, the other segments as they read). A is scaled as LoRA initialises it (1 /
    sqrt(fan-in)), so that the deltas are as large as with the other configs' fan-ins."""
    assert group_shape(WIDE, LoraGroup.DOWN)[0] > sgmv.kpart
    pool, ws = _pool(sgmv, 16, [16, 5, 12], dtype, WIDE)
    for w in ws:
        for a, _ in w.modules.values():
            a /= a.shape[1] ** 0.5
    for slot, w in enumerate(ws):
        pool.write(slot, w)
    if dtype is torch.float16:  # the reference over the weights as the slots hold them
        ws = [LoraWeights(w.key, {m: (a.half().float(), b.half().float()) for m, (a, b) in w.modules.items()})
              for w in ws]
    slots: list[int | None] = [0, 1, None, 0, 2, 2, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0]
    g = torch.Generator().manual_seed(3)
    fan_in, fan_outs = group_shape(WIDE, LoraGroup.DOWN)
    x = torch.randn(len(slots), fan_in, generator=g)
    out = torch.randn(len(slots), sum(fan_outs), generator=g)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            batch = LoraBatch.build([None if s is None else (pool, s) for s in slots], CPU)
            assert batch is not None
            got = _apply(batch, 1, LoraGroup.DOWN, x, out)
            torch.testing.assert_close(got.double(), _reference(ws, slots, 1, LoraGroup.DOWN, x, out, WIDE),
                                       atol=1e-4, rtol=1e-5)
            for row in (0, 1, 4):
                s = slots[row]
                assert s is not None
                alone = LoraBatch.build([(pool, s)], CPU)
                assert alone is not None
                assert torch.equal(_apply(alone, 1, LoraGroup.DOWN, x[row:row + 1], out[row:row + 1])[0],
                                   got[row])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bucket", [8, 16])
def test_float16_slots_match_a_per_row_loop_over_the_rounded_weights(sgmv: LoraSgmv, bucket: int) -> None:
    """Half-precision slots: the kernel widens each weight exactly, so against the fp16-rounded weights it
    is as close as the float32 path (full 16-column tiles through the vector conversion, the partial ones
    of this config through the scalar one, subnormal halves included; small segments widening as they
    read, a large one widening its tiles first); against the float32 weights the difference is fp16's
    rounding."""
    pool, ws = _pool(sgmv, bucket, [bucket, 3, 5], dtype=torch.float16)
    for w in ws:  # some weights in fp16's subnormal range (below 6.1e-5)
        for a, _ in w.modules.values():
            a[0, :5] = torch.tensor([3e-5, -1e-6, 6e-8, 0.0, -2e-5])
    for slot, w in enumerate(ws):
        pool.write(slot, w)
    rounded = [LoraWeights(w.key, {m: (a.half().float(), b.half().float())
                                   for m, (a, b) in w.modules.items()})
               for w in ws]
    # slot 0's 10 rows: a segment large enough to have its fp16 tiles widened once (WIDEN_ROWS)
    slots: list[int | None] = [0, 1, None, 0, 2, 2, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0]
    batch = LoraBatch.build([None if s is None else (pool, s) for s in slots], CPU)
    assert batch is not None and [type(p) for p in batch.parts] == [SgmvPart]
    g = torch.Generator().manual_seed(bucket)
    for group in LoraGroup:
        fan_in, fan_outs = group_shape(CFG, group)
        x = torch.randn(len(slots), fan_in, generator=g)
        out = torch.randn(len(slots), sum(fan_outs), generator=g)
        got = _apply(batch, 1, group, x, out).double()
        torch.testing.assert_close(got, _reference(rounded, slots, 1, group, x, out), atol=1e-4, rtol=1e-5)
        exact = _reference(ws, slots, 1, group, x, out)
        # fp16 rounding shows, at a small fraction of the deltas (randn weights: deltas up to ~200)
        assert 0 < (got - exact).abs().max() < 2e-3 * (exact - out.double()).abs().max()


def test_inputs_with_strided_rows(sgmv: LoraSgmv) -> None:
    """The model hands the kernel views: q/k/v of a fused projection, rows of a wider buffer."""
    pool, ws = _pool(sgmv, 8, [8, 4])
    slots: list[int | None] = [1, 0, 1]
    batch = LoraBatch.build([(pool, s) for s in (1, 0, 1)], CPU)
    assert batch is not None
    wide_x, wide_out = torch.randn(3, 100), torch.randn(3, 400)
    x, out = wide_x[:, 5:5 + 42], wide_out[:, 50:50 + 70]
    expected = _reference(ws, slots, 1, LoraGroup.QKV, x, out)
    batch.apply(1, LoraGroup.QKV, x, out)
    torch.testing.assert_close(wide_out[:, 50:120].double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(sgmv: LoraSgmv, threads: int) -> None:
    pool, _ = _pool(sgmv, 16, [16, 16, 5, 16, 3])
    g = torch.Generator().manual_seed(7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = LoraBatch.build([None if s is None else (pool, s) for s in SLOTS], CPU)
        assert full is not None
        for group in LoraGroup:
            fan_in, fan_outs = group_shape(CFG, group)
            x = torch.randn(len(SLOTS), fan_in, generator=g)
            out = torch.randn(len(SLOTS), sum(fan_outs), generator=g)
            batched = _apply(full, 1, group, x, out)
            for row in (0, 4, 13, 22):  # rows of segments with 8, 1, 2 and 8 rows
                s = SLOTS[row]
                assert s is not None
                alone = LoraBatch.build([(pool, s)], CPU)
                assert alone is not None
                assert torch.equal(_apply(alone, 1, group, x[row:row + 1], out[row:row + 1])[0], batched[row])
    finally:
        torch.set_num_threads(before)


def test_refuses_tensors_it_cannot_read(sgmv: LoraSgmv) -> None:
    pool, _ = _pool(sgmv, 8, [8])
    batch = LoraBatch.build([(pool, 0), (pool, 0)], CPU)
    assert batch is not None
    x, out = torch.randn(2, 42), torch.randn(2, 70)
    with pytest.raises(ValueError, match="float32"):
        batch.apply(0, LoraGroup.QKV, x.double(), out)
    with pytest.raises(ValueError, match="float32"):
        batch.apply(0, LoraGroup.QKV, torch.randn(42, 2).t(), out)
    with pytest.raises(ValueError, match="shapes"):
        batch.apply(0, LoraGroup.QKV, x[:1], out)  # the plan has a row 1
    with pytest.raises(ValueError, match="shapes"):
        batch.apply(0, LoraGroup.QKV, torch.randn(2, 41), out)


def test_a_plan_never_points_outside_the_pool(sgmv: LoraSgmv) -> None:
    pool, _ = _pool(sgmv, 8, [8, 8])
    with pytest.raises(ValueError, match="range"):
        SgmvPart.build(pool, sgmv, [(0, 0), (pool.capacity, 1)])  # the zero slot is no adapter's
    part = SgmvPart.build(pool, sgmv, [(0, 3), (0, 5), (2, 0)])
    assert part.plan.tolist() == [0, 2, 0, 2, 3, 3, 5, 0] and part.nseg == 2 and part.max_row == 5


def test_packing_keeps_every_value_and_drops_the_zero_blocks(sgmv: LoraSgmv) -> None:
    m = torch.arange(2 * 3 * 37, dtype=torch.float32).view(2, 3, 37)  # 2 full tiles of 16 and one of 5
    packed = pack_tiles(m, 16)
    assert packed.shape == (2, 3 * 37)
    assert torch.equal(packed[:, :48].view(2, 3, 16), m[:, :, :16])
    assert torch.equal(packed[:, 48:96].view(2, 3, 16), m[:, :, 16:32])
    assert torch.equal(packed[:, 96:].view(2, 3, 5), m[:, :, 32:])
    packed_pool = LoraPool(CFG, 16, 2, torch.float32, CPU, SgmvLora(sgmv))
    plain_pool = LoraPool(CFG, 16, 2, torch.float32, CPU, GemmLora())
    for pool in (packed_pool, plain_pool):
        numel = sum(t[:, 0].numel() for t in pool.a + pool.b)
        assert numel * 4 == LoraPool.slot_bytes(CFG, 16, 4, pool.backend)
    # B of q/k/v and gate/up without their zero blocks: 1/3 and 1/2 of the block-diagonal size.
    assert packed_pool.b[LoraGroup.QKV][:, 0].numel() * 3 == plain_pool.b[LoraGroup.QKV][:, 0].numel()
    assert packed_pool.b[LoraGroup.GATE_UP][:, 0].numel() * 2 == plain_pool.b[LoraGroup.GATE_UP][:, 0].numel()


def test_packed_pools_are_cpu_float32_or_float16_only(sgmv: LoraSgmv) -> None:
    with pytest.raises(ValueError, match="float32"):
        LoraPool(CFG, 8, 1, torch.bfloat16, CPU, SgmvLora(sgmv))

"""What the machine and the model allow: measured GEMM FLOP/s and memory bandwidth, and the
linear-layer ceiling of the loaded model (one decode step's worth of its own weight matrices).

A decode step cannot be faster than its linear layers: every layer's q/k/v/o/gate/up/down and the
lm_head must be read and multiplied once per step, whatever the batch. Timing exactly those GEMMs on
random [B, in] inputs (on the CPU each in the faster of its two layouts) gives a ceiling of B tokens per
that time, attention, norms, sampling, LoRA and scheduling all excluded, against which the engine's
throughput is judged. That ceiling is torch's (MKL's, cuBLAS's) matmul; the engine's own projections
(on the CPU its C kernel, engine/csrc/linear.c) are timed on the same inputs beside it, so that a
ratio against torch's ceiling is never mistaken for one against what the engine's own layers allow.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraserve.engine.models.decoder import Decoder
from loraserve.engine.ops.linear import Projection


@dataclass(frozen=True)
class RooflineConfig:
    gemm_size: int = 2048  # n of the n x n x n matmul
    copy_bytes: int = 256 << 20  # size of the copied tensor
    repeats: int = 5  # best of this many

    def __post_init__(self) -> None:
        if self.gemm_size < 16 or self.copy_bytes < (1 << 20) or self.repeats < 1:
            raise ValueError("gemm_size >= 16, copy_bytes >= 1 MiB and repeats >= 1 required")


@dataclass(frozen=True)
class MachineRoofline:
    gemm_flop_s: float
    copy_bytes_s: float  # bytes read + written per second
    threads: int  # torch's CPU threads while measuring (the ceiling's too)
    processor: str  # the CPU's model name, or the GPU's: which machine kind a figure comes from


def processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


@dataclass(frozen=True)
class CeilingPoint:
    batch: int
    step_ms: float  # measured: all linear layers of one decode step at this batch (CPU: best layouts)
    engine_ms: float  # measured: the same products through the engine's own projections (ops/linear.py)
    tok_s: float  # batch / step time
    weight_bytes: int
    flops: float  # 2 * params * batch
    ideal_ms: float  # roofline: max(weight bytes / bandwidth, flops / GEMM rate)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls after one untimed one: the machine's capability, not its noise."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def measure_machine(device: torch.device, dtype: torch.dtype, cfg: RooflineConfig) -> MachineRoofline:
    n = cfg.gemm_size
    return MachineRoofline(
        gemm_flop_s=2.0 * n ** 3 / _gemm_seconds(n, device, dtype, cfg.repeats),
        copy_bytes_s=2.0 * cfg.copy_bytes / _copy_seconds(cfg.copy_bytes, device, cfg.repeats),
        threads=torch.get_num_threads(),
        processor=processor_name(device),
    )


def _gemm_seconds(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return best_time(lambda: torch.mm(a, b, out=out), device, repeats)


def _copy_seconds(nbytes: int, device: torch.device, repeats: int) -> float:
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return best_time(lambda: dst.copy_(src), device, repeats)  # reads and writes nbytes each


def _projections(model: Decoder) -> list[Projection]:
    """The model's own projections (q/k/v and gate/up fused, as the engine runs them), lm_head last."""
    return [*(p for lw in model.layers for p in (lw.qkv, lw.o, lw.gate_up, lw.down)), model.lm_head]


@torch.inference_mode()
def linear_ceiling(model: Decoder, batches: list[int], machine: MachineRoofline | None,
                   repeats: int) -> list[CeilingPoint]:
    projections = _projections(model)
    # [out, in]: views where the engine keeps only [in, out], copies where it keeps packed panels
    weights = [p.out_in() for p in projections]
    device, dtype = weights[0].device, weights[0].dtype
    params = sum(w.numel() for w in weights)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    # On the CPU a matrix counts at the faster of its two layouts, whichever the engine keeps: MKL's
    # speed depends on the layout for few rows (engine/ops/linear.py). Copies of the missing layouts live
    # for the measurement only.
    pairs = [(w.contiguous(), w.t().contiguous()) for w in weights] if device.type == "cpu" else []
    points = []
    for batch in sorted(set(batches)):
        inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device).to(dtype) for w in weights}
        if pairs:
            seconds = _best_layouts_seconds(pairs, inputs, repeats)
        else:
            def step(inputs: dict[int, torch.Tensor] = inputs) -> None:
                for w in weights:
                    F.linear(inputs[w.shape[1]], w)

            seconds = best_time(step, device, repeats)

        steps = [(p, inputs[w.shape[1]]) for p, w in zip(projections, weights, strict=True)]

        def engine_step(steps: list[tuple[Projection, torch.Tensor]] = steps) -> None:
            for p, x in steps:
                p(x)

        engine_s = best_time(engine_step, device, repeats)
        flops = 2.0 * params * batch
        ideal = (max(nbytes / machine.copy_bytes_s, flops / machine.gemm_flop_s) if machine else float("nan"))
        points.append(CeilingPoint(batch, seconds * 1e3, engine_s * 1e3, batch / seconds, nbytes, flops,
                                   ideal * 1e3))
    return points


def _best_layouts_seconds(pairs: list[tuple[torch.Tensor, torch.Tensor]], inputs: dict[int, torch.Tensor],
                          repeats: int) -> float:
    """One step's worth of products, each matrix at the best time of its faster layout over `repeats` + 1
    passes; pairs are ([out, in], [in, out]). The passes run every matrix in model order, as a step does,
    so no matrix stays in cache between its timings."""
    best = [[float("inf"), float("inf")] for _ in pairs]
    for _ in range(repeats + 1):
        for i, (w, wt) in enumerate(pairs):
            x = inputs[w.shape[1]]
            t0 = time.perf_counter()
            F.linear(x, w)
            t1 = time.perf_counter()
            torch.mm(x, wt)
            t2 = time.perf_counter()
            best[i] = [min(best[i][0], t1 - t0), min(best[i][1], t2 - t1)]
    return sum(min(b) for b in best)

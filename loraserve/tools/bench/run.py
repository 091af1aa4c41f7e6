"""`loraserve bench`: throughput and latency of the multi-LoRA engine on an S-LoRA-style workload.

One run measures, on the same weights, adapters and requests: our engine with adapters, our engine
without (`--compare-no-adapter`), HF transformers + PEFT mixed-adapter batches and plain HF
(`--baseline`, `--baseline-no-adapter`), the machine's GEMM rate and bandwidth, and the model's
linear-layer ceiling; it prints them with the ratios between them and the command that reproduces it.
A benchmark prints figures; it is never a timed test. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import gc
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import EMBEDDED, load_backend
from loraserve.engine.lora.pool import rank_bucket
from loraserve.engine.models.decoder import Decoder
from loraserve.tools.bench.report import print_report, ratios
from loraserve.tools.bench.roofline import CeilingPoint, RooflineConfig, linear_ceiling, measure_machine
from loraserve.tools.bench.workload import (
    BenchRequest,
    Popularity,
    WorkloadSpec,
    drive,
    make_requests,
    without_adapters,
    write_adapters,
)
from loraserve.types import LORA_TARGETS


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class DType(enum.Enum):
    AUTO = "auto"  # float32 on CPU, bfloat16 on CUDA (the engine's choice)
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    GGUF = "gguf"  # a GGUF file's own quantization, multiplied as stored (CPU)


class LoraDType(enum.Enum):
    AUTO = "auto"  # the model's dtype
    FLOAT16 = "float16"  # half-precision adapter slots (CPU kernel only; EngineConfig.lora_dtype)


# The target workload, and what `--quick` shrinks it to; explicit options win over both.
DEFAULTS: dict[str, Any] = dict(
    adapters=16, rank=16, requests=32, concurrency=32, prompt_len=128, output_len=128
)
QUICK: dict[str, Any] = dict(adapters=4, rank=8, requests=8, concurrency=4, prompt_len=32, output_len=16)
QUICK_ROOFLINE = RooflineConfig(gemm_size=512, copy_bytes=32 << 20, repeats=2)


@dataclass(frozen=True)
class BenchConfig:
    model: str = EMBEDDED
    device: Device = Device.CPU
    dtype: DType = DType.AUTO
    lora_dtype: LoraDType = LoraDType.AUTO
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    max_num_seqs: int | None = None  # None: the engine's default, raised to the concurrency
    max_num_batched_tokens: int | None = None
    max_loras: int | None = None
    threads: int | None = None
    prefix_caching: bool = True
    cuda_graphs: bool = True
    native_kernels: bool = True
    baseline: bool = True
    baseline_no_adapter: bool = True
    compare_no_adapter: bool = True
    roofline: bool = True
    warmup: bool = True
    quick: bool = False
    json_path: Path | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a source")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")

    def engine_config(self) -> EngineConfig:
        base = EngineConfig()
        w = self.workload
        return EngineConfig(
            device=self.device.value, dtype=self.dtype.value,
            max_num_seqs=self.max_num_seqs or max(base.max_num_seqs, w.concurrency),
            max_num_batched_tokens=self.max_num_batched_tokens or base.max_num_batched_tokens,
            max_loras=self.max_loras or base.max_loras,
            max_queue=max(base.max_queue, w.requests),  # an open-loop burst must queue, not be refused
            threads=self.threads or base.threads,
            prefix_caching=self.prefix_caching, cuda_graphs=self.cuda_graphs,
            native_kernels=self.native_kernels, lora_dtype=self.lora_dtype.value,
        )

    def argv(self) -> list[str]:
        """Every option spelled out, so the command reproduces this run whatever the defaults become."""
        w = self.workload
        args = ["--model", self.model, "--device", self.device.value, "--dtype", self.dtype.value,
                "--lora-dtype", self.lora_dtype.value,
                "--adapters", str(w.adapters), "--registered", str(w.registered), "--rank", str(w.rank),
                "--targets", ",".join(w.targets), "--popularity", w.popularity.value, "--alpha", str(w.alpha),
                "--no-adapter-fraction", str(w.no_adapter_fraction), "--requests", str(w.requests),
                "--concurrency", str(w.concurrency), "--prompt-len", str(w.prompt_len),
                "--shared-prefix", str(w.shared_prefix), "--output-len", str(w.output_len),
                "--seed", str(w.seed)]
        if w.rate is not None:
            args += ["--rate", str(w.rate)]
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "threads"):
            if getattr(self, name) is not None:
                args += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        for name in ("prefix_caching", "cuda_graphs", "native_kernels", "baseline", "baseline_no_adapter",
                     "compare_no_adapter", "roofline", "warmup"):
            if not getattr(self, name):
                args.append("--no-" + name.replace("_", "-"))
        if self.quick:
            args.append("--quick")
        return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraserve bench", description=__doc__.split("\n\n")[0],
                                epilog="--quick shrinks every workload default; explicit options still win.")
    a = p.add_argument
    a("--model", default=EMBEDDED,
      help="embedded, random:NAME, a .gguf file or an HF directory (default: embedded)")
    a("--device", choices=[d.value for d in Device], default=Device.CPU.value, help="(default: cpu)")
    a("--dtype", choices=[d.value for d in DType], default=DType.AUTO.value,
      help="(default: auto = float32 on CPU, bfloat16 on CUDA)")
    a("--lora-dtype", choices=[d.value for d in LoraDType], default=LoraDType.AUTO.value,
      help="our engine's adapter slots: float16 halves what the CPU LoRA kernel reads "
           "(default: auto = the model's)")

    def sized(flag: str, what: str) -> None:
        key = flag.removeprefix("--").replace("-", "_")
        a(flag, type=int, help=f"{what} (default: {DEFAULTS[key]}; --quick: {QUICK[key]})")

    sized("--adapters", "distinct random adapters")
    a("--registered", type=int, help="adapters on disk that requests draw from (default: --adapters)")
    sized("--rank", "LoRA rank")
    a("--targets", default=",".join(LORA_TARGETS), help="comma-separated projections (default: all seven)")
    a("--popularity", choices=[p.value for p in Popularity], default=Popularity.POWERLAW.value,
      help="which adapter a request uses (default: powerlaw)")
    a("--alpha", type=float, default=1.0, help="power-law exponent (default: 1.0)")
    a("--no-adapter-fraction", type=float, default=0.0, help="share of adapter-free requests (default: 0)")
    sized("--requests", "requests")
    sized("--concurrency", "closed-loop requests in flight; the HF baseline's batch")
    a("--rate", type=float, help="open loop: Poisson arrivals per second instead of the closed loop")
    sized("--prompt-len", "prompt tokens")
    a("--shared-prefix", type=int, default=0,
      help="leading prompt tokens common to every request, like a system prompt (default: 0)")
    sized("--output-len", "new tokens per request, EOS ignored")
    a("--seed", type=int, default=0, help="workload seed: prompts, adapter choice, arrivals (default: 0)")
    a("--max-num-seqs", type=int, help="engine batch limit (default: the engine's, at least --concurrency)")
    a("--max-num-batched-tokens", type=int, help="engine tokens per step (default: the engine's)")
    a("--max-loras", type=int, help="engine adapter slots (default: the engine's)")
    a("--threads", type=int, help="CPU threads (default: all cores)")
    for flag, what in (("prefix-caching", "the engine reuses cached prompt prefixes within a phase"),
                       ("cuda-graphs", "the engine replays decode steps as CUDA graphs (CUDA only)"),
                       ("native-kernels", "CPU projections, decode attention, multi-LoRA and layer glue "
                                          "in C kernels, not torch ops"),
                       ("baseline", "HF transformers + PEFT on the same workload"),
                       ("baseline-no-adapter", "HF without adapters too"),
                       ("compare-no-adapter", "our engine with every request adapter-free too"),
                       ("roofline", "machine roofline and linear-layer ceiling"),
                       ("warmup", "a short uncounted warm-up")):
        a("--" + flag, action=argparse.BooleanOptionalAction, default=True, help=what + " (default: on)")
    a("--quick", action="store_true", help="a smoke run with tiny workload defaults")
    a("--json", type=Path, help="write every figure to this file")
    return p


def config_from_args(ns: argparse.Namespace) -> BenchConfig:
    defaults = QUICK if ns.quick else DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(ns, name)
        return defaults[name] if value is None else value

    adapters = pick("adapters")
    workload = WorkloadSpec(
        adapters=adapters, registered=adapters if ns.registered is None else ns.registered, rank=pick("rank"),
        targets=tuple(t.strip() for t in ns.targets.split(",") if t.strip()),
        popularity=Popularity(ns.popularity), alpha=ns.alpha, no_adapter_fraction=ns.no_adapter_fraction,
        requests=pick("requests"), concurrency=pick("concurrency"), rate=ns.rate,
        prompt_len=pick("prompt_len"), shared_prefix=ns.shared_prefix, output_len=pick("output_len"),
        seed=ns.seed)
    return BenchConfig(
        model=ns.model, device=Device(ns.device), dtype=DType(ns.dtype), lora_dtype=LoraDType(ns.lora_dtype),
        workload=workload,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        max_loras=ns.max_loras, threads=ns.threads, prefix_caching=ns.prefix_caching,
        cuda_graphs=ns.cuda_graphs,
        native_kernels=ns.native_kernels, baseline=ns.baseline, baseline_no_adapter=ns.baseline_no_adapter,
        compare_no_adapter=ns.compare_no_adapter, roofline=ns.roofline, warmup=ns.warmup, quick=ns.quick,
        json_path=ns.json)


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _warmup(backend: AsyncEngine, cfg: BenchConfig, requests: list[BenchRequest], refs: list[Any]) -> None:
    # The most popular adapters (as many as the device slots hold, so none evicts another) and one
    # adapter-free request: a long-running server has its hot adapters resident, and the first steps'
    # one-off costs are not the workload's.
    engine = backend.engine
    slots = engine.adapters.pool_capacity(rank_bucket(cfg.workload.rank))
    warm = [BenchRequest(requests[i % len(requests)].prompt, ref)
            for i, ref in enumerate([*refs[:slots], None])]
    spec = dataclasses.replace(cfg.workload, requests=len(warm), concurrency=len(warm), rate=None)
    asyncio.run(drive(backend, warm, spec, "warmup", max_tokens=2))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Everything measured, as the JSON figures."""
    w = cfg.workload
    started = time.perf_counter()
    _log(f"loading {cfg.model} on {cfg.device.value}")
    ecfg = cfg.engine_config()
    # The roofline and the HF baseline run on this thread: with the engine's CPU thread count.
    torch.set_num_threads(ecfg.threads)
    backend = load_backend(cfg.model, ecfg)
    model_cfg, tokenizer = backend.engine.cfg, backend.tokenizer
    device, dtype = backend.engine.device, backend.engine.dtype
    figures: dict[str, Any] = {
        "command": "loraserve bench " + shlex.join(cfg.argv()),
        "config": {**dataclasses.asdict(w), "popularity": w.popularity.value, "model": cfg.model,
                   "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                   "engine": dataclasses.asdict(backend.engine.ecfg)},
        "runs": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    try:
        try:
            _log(f"writing {w.adapters} random rank-{w.rank} adapters ({w.registered} registered) to {tmp}")
            refs = write_adapters(tmp, model_cfg, w, dtype)
            requests = make_requests(w, model_cfg.vocab_size, refs)
            figures["config"]["distinct_adapters_requested"] = len(
                {r.adapter.key for r in requests if r.adapter}
            )
            _measure_ours(backend, cfg, requests, refs, figures)
        finally:
            model = backend.engine.model
            backend.shutdown()
            del backend  # the HF model needs the memory (a 7B model twice does not fit every GPU)
            _free(device)
        if cfg.roofline:
            _measure_roofline(model, cfg, figures)
        del model
        if cfg.baseline:
            from loraserve.tools.bench.baseline import run_baseline

            _log("HF transformers + PEFT baseline (slow)")
            for result in run_baseline(cfg.model, model_cfg, tokenizer, requests, w.concurrency, w.output_len,
                                       device, dtype, engine_seed(cfg), cfg.baseline_no_adapter):
                key = "hf_peft_mixed" if result.label.startswith("HF+PEFT") else "hf_no_adapter"
                figures["runs"][key] = {"label": result.label, **result.summary()}
            _free(device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures["ratios"] = ratios(figures)
    figures["bench_wall_s"] = time.perf_counter() - started
    return figures


def _measure_ours(backend: AsyncEngine, cfg: BenchConfig, requests: list[BenchRequest], refs: list[Any],
                  figures: dict[str, Any]) -> None:
    w = cfg.workload
    if cfg.warmup:
        _log("warm-up")
        _warmup(backend, cfg, requests, refs)
    _log(f"ours: {w.requests} requests")
    figures["runs"]["ours"] = asyncio.run(drive(backend, requests, w, "ours")).summary()
    if cfg.compare_no_adapter:
        _log("ours without adapters")
        figures["runs"]["ours_no_adapter"] = asyncio.run(
            drive(backend, without_adapters(requests), w, "bare")).summary()


def _measure_roofline(model: Decoder, cfg: BenchConfig, figures: dict[str, Any]) -> None:
    """Runs after the engine's step thread is gone: while its OpenMP team lives, another thread's
    parallel ops would be throttled (see async_engine.py) and the ceiling would come out too low."""
    w = cfg.workload
    _log("roofline")
    cuda = model.device.type == "cuda"
    rcfg = QUICK_ROOFLINE if cfg.quick else RooflineConfig(
        gemm_size=8192 if cuda else 2048, copy_bytes=(2 << 30) if cuda else (256 << 20))
    machine = measure_machine(model.device, model.dtype, rcfg)
    # Open loop: the batch the run really had, not the concurrency (which then only sizes HF's batches).
    at = w.concurrency if w.rate is None else max(1, round(figures["runs"]["ours"]["mean_batch"] or 1))
    points: list[CeilingPoint] = linear_ceiling(model, [1, at], machine, rcfg.repeats)
    figures["machine"] = dataclasses.asdict(machine)
    figures["ceiling"] = [dataclasses.asdict(p) for p in points]
    figures["ceiling_batch"] = at


def engine_seed(cfg: BenchConfig) -> int:
    return cfg.engine_config().seed  # random:* weights depend on it; the baseline rebuilds them with it


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
        cfg = config_from_args(ns)
    except SystemExit as exc:  # --help, or a bad option (argparse printed why)
        return int(exc.code or 0)
    except ValueError as exc:
        print(f"loraserve bench: error: {exc}", file=sys.stderr)
        return 2
    if cfg.json_path is not None and not cfg.json_path.parent.is_dir():
        print(f"loraserve bench: error: no directory for {cfg.json_path}", file=sys.stderr)
        return 2
    if cfg.device is Device.CUDA and not torch.cuda.is_available():
        print("loraserve bench: error: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    figures = run(cfg)
    print_report(figures)
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps(figures, indent=2, default=str))
        _log(f"figures written to {cfg.json_path}")
    return 0 if figures["runs"]["ours"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

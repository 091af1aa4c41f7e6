"""`loraserve bench`: throughput and latency of the multi-LoRA engine on an S-LoRA-style workload.

This module is its command line (the parser's description is the line above): the options, the workload
defaults and what `--quick` shrinks them to, and BenchConfig, one run as parsed, which spells itself back out
as the command that reproduces it. run.py measures it.
"""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraserve.engine.config import EngineConfig, Quantization
from loraserve.engine.sources import EMBEDDED
from loraserve.tools.bench.roofline import RooflineConfig
from loraserve.tools.bench.workload import Popularity, WorkloadSpec
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


class KvDType(enum.Enum):
    AUTO = "auto"  # float16 for GGUF blocks, the compute dtype otherwise (EngineConfig.kv_dtype)
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class LoraDType(enum.Enum):
    AUTO = "auto"  # EngineConfig.lora_dtype's default: float16 beside GGUF blocks, else the model's dtype
    FLOAT32 = "float32"
    FLOAT16 = "float16"  # half-precision adapter slots (CPU kernel only)


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
    quantize: Quantization | None = None  # a Hugging Face directory quantized at load (EngineConfig)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    max_num_seqs: int | None = None  # None: the engine's default, raised to the concurrency
    max_num_batched_tokens: int | None = None
    max_loras: int | None = None
    kv_cache_bytes: int | None = None  # None: the engine's default budget
    kv_dtype: KvDType = KvDType.AUTO
    threads: int | None = None
    prefix_caching: bool = True
    cuda_graphs: bool = True
    native_kernels: bool = True
    baseline: bool = True
    baseline_no_adapter: bool = True
    compare_no_adapter: bool = True
    roofline: bool = True
    warmup: bool = True
    # The workload again through `serve --engine-process`'s split (EngineClient), back to back with ours.
    engine_process: bool = False
    adaptive_threads: bool = False  # as `serve` runs by default (engine/thread_governor.py)
    quick: bool = False
    json_path: Path | None = None
    llamacpp: bool | None = None  # None: on when llama_cpp is installed, the device a CPU and a file found
    llamacpp_model: Path | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a source")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "threads", "kv_cache_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")

    def engine_config(self) -> EngineConfig:
        base = EngineConfig()
        w = self.workload
        return EngineConfig(
            device=self.device.value, quantize=self.quantize,
            dtype=DType.GGUF.value if self.quantize and self.dtype is DType.AUTO else self.dtype.value,
            max_num_seqs=self.max_num_seqs or max(base.max_num_seqs, w.concurrency),
            max_num_batched_tokens=self.max_num_batched_tokens or base.max_num_batched_tokens,
            max_loras=self.max_loras or base.max_loras,
            kv_cache_bytes=self.kv_cache_bytes or base.kv_cache_bytes, kv_dtype=self.kv_dtype.value,
            max_queue=max(base.max_queue, w.requests),  # an open-loop burst must queue, not be refused
            threads=self.threads or base.threads,
            prefix_caching=self.prefix_caching, cuda_graphs=self.cuda_graphs,
            native_kernels=self.native_kernels, lora_dtype=self.lora_dtype.value,
            adaptive_threads=self.adaptive_threads,
        )

    def argv(self) -> list[str]:
        """Every option spelled out, so the command reproduces this run whatever the defaults become."""
        w = self.workload
        args = ["--model", self.model, "--device", self.device.value, "--dtype", self.dtype.value,
                "--lora-dtype", self.lora_dtype.value, "--kv-dtype", self.kv_dtype.value,
                "--adapters", str(w.adapters), "--registered", str(w.registered), "--rank", str(w.rank),
                "--targets", ",".join(w.targets), "--popularity", w.popularity.value, "--alpha", str(w.alpha),
                "--no-adapter-fraction", str(w.no_adapter_fraction), "--requests", str(w.requests),
                "--concurrency", str(w.concurrency), "--prompt-len", str(w.prompt_len),
                "--shared-prefix", str(w.shared_prefix), "--output-len", str(w.output_len),
                "--seed", str(w.seed)]
        if w.rate is not None:
            args += ["--rate", str(w.rate)]
        if self.quantize is not None:
            args += ["--quantize", self.quantize.value]
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "threads", "kv_cache_bytes"):
            if getattr(self, name) is not None:
                args += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        for name in ("prefix_caching", "cuda_graphs", "native_kernels", "baseline", "baseline_no_adapter",
                     "compare_no_adapter", "roofline", "warmup"):
            if not getattr(self, name):
                args.append("--no-" + name.replace("_", "-"))
        if self.engine_process:
            args.append("--engine-process")
        if self.adaptive_threads:
            args.append("--adaptive-threads")
        if self.quick:
            args.append("--quick")
        if self.llamacpp is not None:
            args.append("--llamacpp" if self.llamacpp else "--no-llamacpp")
        if self.llamacpp_model is not None:
            args += ["--llamacpp-model", str(self.llamacpp_model)]
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
    a("--quantize", choices=[q.value for q in Quantization],
      help="quantize a Hugging Face directory at load, served as --dtype gguf (default: no)")

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
    a("--kv-cache-bytes", type=int, help="engine KV cache budget (default: the engine's)")
    a("--kv-dtype", choices=[k.value for k in KvDType], default=KvDType.AUTO.value,
      help="KV cache elements (default: auto, float16 for GGUF blocks)")
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
    a("--llamacpp", action=argparse.BooleanOptionalAction, default=None,
      help="llama.cpp (llama-cpp-python) on the same GGUF file, threads and requests, one request at a "
           "time (default: on when it is installed, the device is the CPU and there is a file)")
    a("--llamacpp-model", type=Path,
      help="the GGUF file llama.cpp runs (default: --model's own file); with a random:* model our engine "
           "runs this file too")
    a("--engine-process", action="store_true",
      help="also run the workload through an engine process, as `serve --engine-process` does (EngineClient: "
           "tokens, aborts and gauges over a pipe), right after the in-process run (default: off)")
    a("--adaptive-threads", action="store_true",
      help="the engine steps with a thread fewer while other work waits for the cores, as `serve` does by "
           "default (default: off: always --threads)")
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
        kv_dtype=KvDType(ns.kv_dtype),
        quantize=None if ns.quantize is None else Quantization(ns.quantize),
        workload=workload,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        max_loras=ns.max_loras, kv_cache_bytes=ns.kv_cache_bytes, threads=ns.threads,
        prefix_caching=ns.prefix_caching,
        cuda_graphs=ns.cuda_graphs,
        native_kernels=ns.native_kernels, baseline=ns.baseline, baseline_no_adapter=ns.baseline_no_adapter,
        compare_no_adapter=ns.compare_no_adapter, roofline=ns.roofline, warmup=ns.warmup, quick=ns.quick,
        engine_process=ns.engine_process, adaptive_threads=ns.adaptive_threads,
        json_path=ns.json, llamacpp=ns.llamacpp, llamacpp_model=ns.llamacpp_model)

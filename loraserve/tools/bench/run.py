"""`loraserve bench`: throughput and latency of the multi-LoRA engine on an S-LoRA-style workload.

One run measures, on the same weights, adapters and requests: our engine with adapters, our engine
without (`--compare-no-adapter`), HF transformers + PEFT mixed-adapter batches and plain HF
(`--baseline`, `--baseline-no-adapter`), llama.cpp on the same GGUF file (`--llamacpp`), the machine's
GEMM rate and bandwidth, and the model's linear-layer ceiling; it prints them with the ratios between them
and the command that reproduces it.
A benchmark prints figures; it is never a timed test. See BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.config import EngineConfig
from loraserve.engine.loader import load_backend
from loraserve.engine.lora.pool import rank_bucket
from loraserve.engine.models.decoder import Decoder
from loraserve.engine.ops.quant_linear import QuantLinear, QuantProjections
from loraserve.tools.bench import llamacpp
from loraserve.tools.bench.model_file import ensure_written, llamacpp_file
from loraserve.tools.bench.options import QUICK_ROOFLINE, BenchConfig, Device, build_parser, config_from_args
from loraserve.tools.bench.report import print_report, ratios
from loraserve.tools.bench.roofline import CeilingPoint, RooflineConfig, linear_ceiling, measure_machine
from loraserve.tools.bench.workload import (
    BenchRequest,
    drive,
    make_requests,
    without_adapters,
    write_adapters,
)
from loraserve.types import Backend


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _warmup(backend: Backend, cfg: BenchConfig, requests: list[BenchRequest], refs: list[Any],
            slots: int) -> None:
    # The most popular adapters (as many as the device slots hold, so none evicts another) and one
    # adapter-free request: a long-running server has its hot adapters resident, and the first steps'
    # one-off costs are not the workload's.
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
    gguf_file = llamacpp_file(cfg.model, cfg.llamacpp_model, cfg.llamacpp, cfg.device is Device.CPU)
    if gguf_file.reason:
        _log(f"llama.cpp baseline skipped: {gguf_file.reason}")
    ensure_written(gguf_file, _log)
    source = str(gguf_file.path) if gguf_file.engine_loads_it else cfg.model
    _log(f"loading {source} on {cfg.device.value}")
    ecfg = cfg.engine_config()
    backend = load_backend(source, ecfg)
    # While the engine runs, this thread's torch work (writing the adapters) stays on one thread: an
    # OpenMP team of its own beside the engine's puts more threads than cores on a small machine, and
    # libgomp then stops spinning between parallel regions, which cost a 7B decode step ~20%.
    torch.set_num_threads(1)
    model_cfg, tokenizer = backend.engine.cfg, backend.tokenizer
    device, dtype = backend.engine.device, backend.engine.dtype
    figures: dict[str, Any] = {
        "command": "loraserve bench " + shlex.join(cfg.argv()),
        "config": {**dataclasses.asdict(w), "popularity": w.popularity.value, "model": cfg.model,
                   "engine_model": source,
                   "llamacpp_model": None if gguf_file.path is None else str(gguf_file.path),
                   # "gguf" where the weights are multiplied as stored (dtype auto picks it for GGUF
                   # sources); the activations' dtype otherwise
                   "device": str(device), "dtype": "gguf" if backend.engine.ecfg.dtype == "gguf"
                   else str(dtype).removeprefix("torch."),
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
            slots = backend.engine.adapters.pool_capacity(rank_bucket(w.rank))
            _measure_ours(backend, cfg, requests, refs, slots, figures)
        finally:
            model = backend.engine.model
            backend.shutdown()
            del backend  # the HF model needs the memory (a 7B model twice does not fit every GPU)
            _free(device)
            # The roofline and the HF baseline run on this thread: with the engine's CPU thread count.
            torch.set_num_threads(ecfg.threads)
        if cfg.roofline:
            _measure_roofline(model, cfg, figures)
        del model
        if cfg.engine_process:
            _measure_engine_process(source, ecfg, cfg, requests, refs, slots, figures)
        if gguf_file.path is not None:
            _log(f"llama.cpp on {gguf_file.path}, one request at a time")
            for lresult in llamacpp.run_llamacpp(gguf_file.path, model_cfg, requests, w.output_len,
                                                 ecfg.threads, tmp):
                figures["runs"][lresult.workload.value] = {"label": lresult.label, **lresult.summary()}
        if cfg.baseline:
            from loraserve.tools.bench.baseline import run_baseline

            _log("HF transformers + PEFT baseline (slow)")
            for result in run_baseline(source, model_cfg, tokenizer, requests, w.concurrency, w.output_len,
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
                  slots: int, figures: dict[str, Any]) -> None:
    w = cfg.workload
    if cfg.warmup:
        _log("warm-up")
        _warmup(backend, cfg, requests, refs, slots)
    _log(f"ours: {w.requests} requests")
    figures["runs"]["ours"] = asyncio.run(drive(backend, requests, w, "ours")).summary()
    if cfg.compare_no_adapter:
        _log("ours without adapters")
        figures["runs"]["ours_no_adapter"] = asyncio.run(
            drive(backend, without_adapters(requests), w, "bare")).summary()


def _measure_engine_process(source: str, ecfg: EngineConfig, cfg: BenchConfig, requests: list[BenchRequest],
                            refs: list[Any], slots: int, figures: dict[str, Any]) -> None:
    """The same requests through the API process's side of the split: what the channel costs."""
    from loraserve.engine.core_process.client import EngineClient

    _log("ours through an engine process")
    client = EngineClient(source, ecfg)
    try:
        if cfg.warmup:
            _warmup(client, cfg, requests, refs, slots)
        figures["runs"]["ours_engine_process"] = asyncio.run(
            drive(client, requests, cfg.workload, "split")).summary()
    finally:
        client.shutdown()


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
    projections = model.ops.projections
    if isinstance(projections, QuantProjections) and isinstance(model.layers[0].qkv, QuantLinear):
        figures["machine"]["quantized_dots"] = projections.kernel.instructions  # AVX2, AVX-VNNI, ...
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
    try:  # asked for and impossible, or a --llamacpp-model that is not there: said now, not after our runs
        found = llamacpp_file(cfg.model, cfg.llamacpp_model, cfg.llamacpp, cfg.device is Device.CPU)
        if cfg.llamacpp and found.path is None:
            raise ValueError(found.reason)
    except ValueError as exc:
        print(f"loraserve bench: error: llama.cpp baseline: {exc}", file=sys.stderr)
        return 2
    figures = run(cfg)
    print_report(figures)
    if cfg.json_path is not None:
        cfg.json_path.write_text(json.dumps(figures, indent=2, default=str))
        _log(f"figures written to {cfg.json_path}")
    return 0 if figures["runs"]["ours"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

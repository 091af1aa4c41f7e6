"""`loraserve bench` end to end on random:tiny with tiny numbers: the figures exist and are sane.

Nothing here asserts a speed: the benchmark prints figures, it is never a timed test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from loraserve.engine.config import ModelConfig, Quantization
from loraserve.engine.kernels.qlinear import load_qlinear
from loraserve.tools.bench.options import build_parser, config_from_args
from loraserve.tools.bench.run import main
from loraserve.tools.bench.workload import Popularity, WorkloadSpec, make_requests, write_adapters

HAVE_PEFT = (
    importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
)
TINY = ["--model", "random:tiny", "--quick", "--requests", "4", "--concurrency", "2", "--prompt-len", "8",
        "--output-len", "5", "--adapters", "2", "--rank", "4"]


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _run(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert main([*TINY, *extra, "--json", str(out)]) == 0
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def test_closed_loop_with_baseline_and_roofline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = _run(tmp_path, *([] if HAVE_PEFT else ["--no-baseline"]))
    runs = figures["runs"]
    expected = {"ours", "ours_no_adapter"} | ({"hf_peft_mixed", "hf_no_adapter"} if HAVE_PEFT else set())
    assert set(runs) == expected
    for run in runs.values():
        assert run["completed"] == 4 and run["output_tokens"] == 4 * 5
        assert _positive(run["output_tok_s"]) and _positive(run["request_s"])
    for key in ("ours", "ours_no_adapter"):
        r = runs[key]
        assert r["failed"] == 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"]
        assert 1 <= r["mean_batch"] <= 2  # never more than the concurrency in flight
        assert r["decode_steps"] >= 1 and _positive(r["decode_step_ms"]) and 0 < r["engine_busy"] <= 1
        assert r["peak"]["kv_blocks_used"] >= 1 and r["final"]["kv_blocks_used"] == 0
    assert runs["ours"]["peak"]["adapters_device"] >= 1
    assert _positive(figures["machine"]["gemm_flop_s"]) and _positive(figures["machine"]["copy_bytes_s"])
    assert figures["machine"]["processor"] and "quantized_dots" not in figures["machine"]  # float32 weights
    assert [p["batch"] for p in figures["ceiling"]] == [1, 2]
    # The roofline and HF run on the bench's own thread after the engine's: with its thread count.
    threads = figures["config"]["engine"]["threads"]
    assert figures["machine"]["threads"] == threads
    assert all(runs[k]["threads"] == threads for k in runs if k.startswith("hf_"))
    assert all(_positive(p["step_ms"]) and _positive(p["tok_s"]) for p in figures["ceiling"])
    ratios = figures["ratios"]
    assert _positive(ratios["adapters_vs_no_adapter"]) and _positive(ratios["ours_vs_ceiling"])
    if HAVE_PEFT:
        assert _positive(ratios["ours_vs_hf_peft_mixed"])
    printed = capsys.readouterr().out
    assert "ours with adapters / ours no adapter" in printed
    assert f"machine: {figures['machine']['processor']}; GEMM" in printed
    assert figures["command"] in printed.replace("\n", "")
    assert figures["command"].startswith("loraserve bench --model random:tiny ")


def test_the_same_workload_through_an_engine_process(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    figures = _run(tmp_path, "--no-baseline", "--no-roofline", "--no-compare-no-adapter", "--engine-process")
    assert "--engine-process" in figures["command"]
    split = figures["runs"]["ours_engine_process"]
    assert split["completed"] == 4 and split["output_tokens"] == 4 * 5 and split["failed"] == 0
    assert 0 < split["ttft_p50_ms"] <= split["ttft_p99_ms"] and _positive(split["output_tok_s"])
    # The engine's steps are not visible from the API process: not reported rather than reported as 0.
    assert split["engine_busy"] is None and split["mean_batch"] is None
    assert _positive(figures["ratios"]["in_process_vs_engine_process"])
    assert "ours, through an engine process" in capsys.readouterr().out


def test_open_loop_many_registered(tmp_path: Path) -> None:
    figures = _run(tmp_path, "--no-baseline", "--no-roofline", "--no-compare-no-adapter", "--registered", "6",
                   "--popularity", "uniform", "--no-adapter-fraction", "0.25", "--rate", "200",
                   "--lora-dtype", "float16")
    ours = figures["runs"]["ours"]
    assert figures["config"]["engine"]["lora_dtype"] == "float16" and (
        "--lora-dtype float16" in figures["command"]
    )
    assert set(figures["runs"]) == {"ours"} and ours["failed"] == 0 and ours["output_tokens"] == 20
    assert "ceiling" not in figures and "ours_vs_hf_peft_mixed" not in figures["ratios"]
    assert figures["config"]["rate"] == 200 and figures["config"]["registered"] == 6


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--adapters", "3", "--registered", "2"]) == 2
    assert main(["--targets", "q_proj,nope"]) == 2
    assert main(["--popularity", "zipfian"]) == 2
    assert main(["--prompt-len", "8", "--shared-prefix", "9"]) == 2
    assert "error" in capsys.readouterr().err


def test_adapters_and_requests(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    spec = WorkloadSpec(adapters=2, registered=5, rank=4, targets=("q_proj", "down_proj"), requests=400,
                        prompt_len=3, output_len=2, seed=7)
    import torch

    refs = write_adapters(tmp_path, cfg, spec, torch.float32)
    assert len({r.key for r in refs}) == 5
    config = json.loads((Path(refs[0].path) / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "down_proj"]
    weights = [Path(r.path) / "adapter_model.safetensors" for r in refs]
    assert os.path.samefile(weights[4], weights[0]) and not os.path.samefile(weights[1], weights[0])

    reqs = make_requests(spec, cfg.vocab_size, refs)
    assert reqs == make_requests(spec, cfg.vocab_size, refs)  # the seed fixes the workload
    assert all(len(r.prompt) == 3 and all(100 <= t < 300 for t in r.prompt) for r in reqs)
    counts = Counter(r.adapter.key for r in reqs if r.adapter)
    assert counts[refs[0].key] > counts[refs[4].key]  # power law: the first adapter is the most popular
    uniform = make_requests(WorkloadSpec(**{**spec.__dict__, "popularity": Popularity.UNIFORM, "rate": 10.0,
                                            "no_adapter_fraction": 1.0}), cfg.vocab_size, refs)
    assert all(r.adapter is None for r in uniform)
    arrivals = [r.arrival_s for r in uniform]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    shared = make_requests(
        WorkloadSpec(**{**spec.__dict__, "prompt_len": 6, "shared_prefix": 4}), cfg.vocab_size, refs
    )
    assert len({tuple(r.prompt[:4]) for r in shared}) == 1 and len({tuple(r.prompt[4:]) for r in shared}) > 1


def test_a_shared_prefix_is_served_from_the_cache(tmp_path: Path) -> None:
    args = ("--no-baseline", "--no-roofline", "--no-compare-no-adapter", "--no-warmup", "--prompt-len", "40",
            "--shared-prefix", "36", "--no-adapter-fraction", "1")
    cached = _run(tmp_path, *args)["runs"]["ours"]
    assert cached["failed"] == 0 and cached["final"]["prefix_cache_hit_tokens"] > 0
    uncached = _run(tmp_path, *args, "--no-prefix-caching")["runs"]["ours"]
    assert uncached["final"]["prefix_cache_hit_tokens"] == 0


def test_quantize_reaches_the_engine_and_the_reproducing_command() -> None:
    cfg = config_from_args(build_parser().parse_args(["--model", "/models/llama", "--quantize", "q4_0"]))
    ecfg = cfg.engine_config()
    assert ecfg.quantize is Quantization.Q4_0 and ecfg.dtype == "gguf"  # auto is gguf with it
    assert config_from_args(build_parser().parse_args(cfg.argv())) == cfg
    assert main(["--quantize", "q5_k"]) == 2


def test_the_machine_line_names_the_quantized_kernel_s_instructions(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A figure says which machine kind it comes from: the processor, and for GGUF blocks the instruction
    set the kernel's dots ran on (AVX2, AVX-VNNI, AVX-512 VNNI), so an emulated build (CC adding
    -mno-avx512f) shows as what it is."""
    kernel = load_qlinear()
    if kernel is None:
        pytest.skip("no C compiler: no quantized kernel")
    out = tmp_path / "bench.json"
    tiny = [*TINY, "--no-baseline", "--no-baseline-no-adapter", "--no-compare-no-adapter", "--json", str(out)]
    assert main([*tiny[:1], "random:tiny:q8_0", *tiny[2:]]) == 0
    figures = json.loads(out.read_text())
    assert figures["machine"]["quantized_dots"] == kernel.instructions
    assert f"quantized dots on {kernel.instructions}; GEMM" in capsys.readouterr().out

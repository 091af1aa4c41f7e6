"""llama.cpp (llama-cpp-python, the `bench` extra) against our engine: the bench's adapters written as GGUF
LoRA files give llama.cpp the logits our engine computes, and `loraserve bench --llamacpp` runs end to
end. Skipped where llama-cpp-python is not installed (CI does not compile it).

The model is a tiny GGUF with float32 projections and a float16 embedding (also the tied head), and
llama.cpp keeps its KV cache in float32 here. Then the one rounding llama.cpp adds is its head's input,
converted to float16 for the float16 weights: at most 2**-11 of each value, so the logits differ by about
that share of their norm (measured 2e-4); the bound is 2x the worst case, 1e-3. The adapter moves the
logits by over 25% (checked: over 100x the bound), and q/k rows in the wrong order put them 26-45% off at
prompts past the first position (measured with the permutation left out), so neither can pass.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from loraserve.engine.config import EngineConfig
from loraserve.engine.llm_engine import LLMEngine
from loraserve.engine.loader import load_engine
from loraserve.tools.bench.gguf_lora import write_gguf_lora
from loraserve.tools.bench.llamacpp import LlamaCppRunner
from loraserve.tools.bench.model_file import ensure_written, model_file
from loraserve.tools.bench.options import build_parser, config_from_args
from loraserve.tools.bench.run import main
from loraserve.tools.bench.workload import WorkloadSpec, write_adapters
from loraserve.types import AdapterRef, SamplingParams

from engine_helpers import random_prompts
from gguf_helpers import tiny_llama, write_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'loraserve[bench]')")

REL_TOL = 1e-3
GGML_F32 = 0  # ggml_type of a float32 KV cache (llama_cpp.Llama's type_k / type_v)


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama(tie=True, seed=3)
    with torch.no_grad():  # spread logits; norms around 1
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(model, path, projection_types=[gguf.GGMLQuantizationType.F32],
               embedding_type=gguf.GGMLQuantizationType.F16)
    return path


def _ours(engine: LLMEngine, prompt: list[int], adapter: AdapterRef | None) -> np.ndarray:
    """The last prompt position's logits, from one prefill step of our engine."""
    seq = engine.add_request(f"p{len(prompt)}-{adapter}", prompt,
                             SamplingParams(max_tokens=1, temperature=0), adapter)
    while not (sched := engine.scheduler.schedule()).scheduled:  # the adapter loads in the background
        pass
    meta, _ = engine.runner.prepare(sched.scheduled)
    logits = engine.model.forward(replace(meta, logits_indices=torch.tensor([len(prompt) - 1])), engine.kv)
    engine.abort(seq.request_id)
    out: np.ndarray = logits[0].numpy().copy()
    return out


def _theirs(runner: LlamaCppRunner, prompt: list[int], lora: Path | None) -> np.ndarray:
    runner.use(lora)
    runner.llm.reset()
    runner.llm.eval(prompt)
    return runner.last_logits().copy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_llamacpp_with_the_written_adapter_gives_our_logits(tiny_f32: Path, tmp_path: Path) -> None:
    engine, _ = load_engine(str(tiny_f32), EngineConfig(dtype="float32", threads=1, block_size=4))
    spec = WorkloadSpec(adapters=1, registered=1, rank=8, requests=1, prompt_len=1, output_len=1)
    ref, = write_adapters(tmp_path / "peft", engine.cfg, spec, torch.float32)  # all seven projections
    lora = write_gguf_lora(Path(ref.path), tmp_path / "lora.gguf", engine.cfg)
    runner = LlamaCppRunner(tiny_f32, n_ctx=64, threads=1, type_k=GGML_F32, type_v=GGML_F32)
    try:
        runner.load_adapter(lora)
        for prompt in random_prompts([1, 9, 40], seed=5):
            base = _ours(engine, prompt, None)
            with_adapter = _ours(engine, prompt, ref)
            assert _rel(_theirs(runner, prompt, None), base) < REL_TOL
            assert _rel(_theirs(runner, prompt, lora), with_adapter) < REL_TOL
            assert _rel(with_adapter, base) > 100 * REL_TOL
    finally:
        runner.close()


def _bench(tmp_path: Path, model: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert main(["--model", model, "--quick", "--requests", "4", "--concurrency", "1", "--prompt-len", "8",
                 "--output-len", "5", "--adapters", "2", "--rank", "4", "--threads", "1", "--no-baseline",
                 "--no-roofline", "--llamacpp", *extra, "--json", str(out)]) == 0
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def test_bench_runs_llamacpp_beside_ours(tiny_f32: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    figures = _bench(tmp_path, str(tiny_f32))
    runs = figures["runs"]
    config = figures["config"]
    assert config["llamacpp_model"] == config["engine_model"] == str(tiny_f32)
    assert "--llamacpp" in figures["command"]
    for key in ("llamacpp_no_adapter", "llamacpp_one_adapter", "llamacpp_distinct", "ours"):
        r = runs[key]
        assert r["completed"] == 4 and r["output_tokens"] == 4 * 5, key
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"], key
        for figure in ("output_tok_s", "prompt_tok_s", "generation_tok_s", "total_tok_s"):
            assert r[figure] > 0, (key, figure)
        # total counts the prompts too; every request here has 8 prompt and 5 output tokens
        assert r["total_tok_s"] == pytest.approx(r["output_tok_s"] * (8 + 5) / 5)
    assert all(runs[k]["threads"] == 1 for k in runs if k.startswith("llamacpp_"))
    # --concurrency 1: the single-stream ratios exist beside the throughput ones
    for name in ("ours_vs_llamacpp_distinct", "ours_no_adapter_vs_llamacpp", "llamacpp_tpot_vs_ours",
                 "ours_prompt_vs_llamacpp"):
        assert figures["ratios"][name] > 0, name
    printed = capsys.readouterr().out
    assert "llama.cpp, own adapter each" in printed and "ours / llama.cpp own adapter each" in printed


def test_prompt_processing_alone(tiny_f32: Path, tmp_path: Path) -> None:
    """--output-len 1: TTFT is the prompt's processing, and there is no TPOT."""
    figures = _bench(tmp_path, str(tiny_f32), "--prompt-len", "64", "--output-len", "1",
                     "--no-compare-no-adapter")
    for key in ("ours", "llamacpp_no_adapter", "llamacpp_distinct"):
        r = figures["runs"][key]
        assert r["prompt_tok_s"] > 0 and r["tpot_p50_ms"] is None and r["generation_tok_s"] is None, key
    assert figures["ratios"]["ours_prompt_vs_llamacpp"] > 0


def test_bad_llamacpp_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "random:tiny", "--llamacpp-model", str(tmp_path / "missing.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--llamacpp"]) == 2  # a directory: no GGUF file to give it
    assert "--llamacpp-model" in capsys.readouterr().err


def test_a_random_model_is_written_once_and_run_by_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LORASERVE_BENCH_CACHE", str(tmp_path / "cache"))
    figures = _bench(tmp_path, "random:tiny:q8_0", "--no-compare-no-adapter")
    written = tmp_path / "cache" / "tiny-q8_0-seed0.gguf"
    config = figures["config"]
    assert config["model"] == "random:tiny:q8_0"
    assert config["llamacpp_model"] == config["engine_model"] == str(written)
    assert figures["runs"]["llamacpp_distinct"]["completed"] == 4
    assert "writing random:tiny:q8_0" in capsys.readouterr().err
    stamp = written.stat().st_mtime_ns
    said: list[str] = []
    ensure_written(model_file("random:tiny:q8_0", None), said.append)  # what the next run does first
    assert written.stat().st_mtime_ns == stamp and not said


def test_skipped_with_a_line_where_there_is_no_file(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["--model", "random:tiny", "--quick", "--requests", "2", "--output-len", "2", "--no-baseline",
                 "--no-roofline", "--no-compare-no-adapter", "--json", str(out)]) == 0
    assert "llama.cpp baseline skipped: random:tiny has float weights" in capsys.readouterr().err
    assert not any(k.startswith("llamacpp_") for k in json.loads(out.read_text())["runs"])


def test_options_reproduce() -> None:
    for extra in ([], ["--llamacpp"], ["--no-llamacpp"], ["--llamacpp-model", "/m/x.gguf"]):
        cfg = config_from_args(build_parser().parse_args(["--model", "embedded", *extra]))
        assert config_from_args(build_parser().parse_args(cfg.argv())) == cfg

"""The bench's ratios and its printed report, both computed from the JSON figures alone (so a saved
`--json` file can be re-read and compared without re-running anything)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_RUN_NAMES = {
    "ours": "ours, with adapters",
    "ours_no_adapter": "ours, no adapter",
    "ours_engine_process": "ours, through an engine process",
    "hf_peft_mixed": "HF+PEFT mixed",
    "hf_no_adapter": "HF, no adapter",
    "llamacpp_no_adapter": "llama.cpp, no adapter",
    "llamacpp_one_adapter": "llama.cpp, one adapter",
    "llamacpp_distinct": "llama.cpp, own adapter each",
}
# (ratio key, numerator run, denominator run, figure): llama.cpp's rows are one stream at a time, so
# TPOT and prompt rate compare only with ours at --concurrency 1 (closed loop); throughput always does.
_LLAMACPP_RATIOS = (
    ("ours_vs_llamacpp_distinct", "ours", "llamacpp_distinct", "output_tok_s"),
    ("ours_no_adapter_vs_llamacpp", "ours_no_adapter", "llamacpp_no_adapter", "output_tok_s"),
)
_LLAMACPP_SINGLE_STREAM = (
    ("llamacpp_tpot_vs_ours", "llamacpp_distinct", "ours", "tpot_p50_ms"),
    ("llamacpp_tpot_vs_ours_no_adapter", "llamacpp_no_adapter", "ours_no_adapter", "tpot_p50_ms"),
    ("ours_prompt_vs_llamacpp", "ours", "llamacpp_distinct", "prompt_tok_s"),
    ("ours_no_adapter_prompt_vs_llamacpp", "ours_no_adapter", "llamacpp_no_adapter", "prompt_tok_s"),
)


def _ceiling_at(figures: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((p for p in figures.get("ceiling", []) if p["batch"] == batch), None)


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    runs = figures["runs"]
    ours = runs["ours"]
    tok_s = ours["output_tok_s"]
    out: dict[str, float] = {}
    for key, name in (("hf_peft_mixed", "ours_vs_hf_peft_mixed"), ("hf_no_adapter", "ours_vs_hf_no_adapter"),
                      ("ours_no_adapter", "adapters_vs_no_adapter"),
                      ("ours_engine_process", "in_process_vs_engine_process")):
        if key in runs and runs[key]["output_tok_s"]:
            out[name] = tok_s / runs[key]["output_tok_s"]
    if "hf_peft_mixed" in runs and "hf_no_adapter" in runs:
        out["hf_peft_mixed_vs_hf_no_adapter"] = (
            runs["hf_peft_mixed"]["output_tok_s"] / runs["hf_no_adapter"]["output_tok_s"]
        )
    config = figures["config"]
    single = config["concurrency"] == 1 and not config["rate"]
    for name, num, den, figure in _LLAMACPP_RATIOS + (_LLAMACPP_SINGLE_STREAM if single else ()):
        if num in runs and den in runs and runs[num].get(figure) and runs[den].get(figure):
            out[name] = runs[num][figure] / runs[den][figure]
    top = _ceiling_at(figures, figures.get("ceiling_batch", 0))
    if top is not None:
        out["ours_vs_ceiling"] = tok_s / top["tok_s"]
        if top.get("engine_ms"):  # absent from --json files written before it was measured
            out["ours_vs_engine_ceiling"] = tok_s * top["engine_ms"] / (1e3 * top["batch"])
        if ours["decode_step_ms"]:
            out["step_vs_ceiling_step"] = top["step_ms"] / ours["decode_step_ms"]
    one = _ceiling_at(figures, 1)
    if one is not None and ours["tpot_p50_ms"] and figures.get("ceiling_batch") == 1:
        # A single stream (--concurrency 1): how close decode gets to the batch-1 linear time.
        out["tpot_vs_batch1_ceiling"] = one["step_ms"] / ours["tpot_p50_ms"]
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_report(figures: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 180)  # piped output: don't wrap the tables at 80 columns
    c = figures["config"]
    console.print(f"[bold]loraserve bench[/]: {c['model']} on {c['device']} ({c['dtype']}); "
                  f"{c['requests']} requests, {c['prompt_len']}-token prompts, {c['output_len']} new tokens; "
                  f"{c['adapters']} adapters of rank {c['rank']} ({c['registered']} registered, "
                  f"{c['distinct_adapters_requested']} requested, {c['popularity']}"
                  f"{' alpha ' + str(c['alpha']) if c['popularity'] == 'powerlaw' else ''}); "
                  + (f"Poisson {c['rate']}/s" if c["rate"] else f"concurrency {c['concurrency']}"))
    table = Table(title="throughput and latency")
    for col in ("run", "out tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                "prompt tok/s", "gen tok/s", "total tok/s",
                "decode batch", "decode step ms", "busy %", "wall s", "failed"):
        table.add_column(col, justify="left" if col == "run" else "right", no_wrap=col == "run")
    for key, name in _RUN_NAMES.items():
        r = figures["runs"].get(key)
        if r is None:
            continue
        table.add_row(r.get("label", name), _f(r["output_tok_s"]), _f(r["request_s"], 2),
                      _f(r.get("ttft_p50_ms")), _f(r.get("ttft_p99_ms")), _f(r.get("tpot_p50_ms")),
                      _f(r.get("tpot_p99_ms")),
                      _f(r.get("prompt_tok_s")), _f(r.get("generation_tok_s")), _f(r.get("total_tok_s")),
                      _f(r.get("mean_batch")), _f(r.get("decode_step_ms")),
                      _f(None if r.get("engine_busy") is None else 100 * r["engine_busy"], 0),
                      _f(r["wall_s"], 2),
                      str(r.get("failed", 0)))
    console.print(table)
    peak = figures["runs"]["ours"]["peak"]
    console.print(f"engine (ours, peak during the run): running {_f(peak.get('running'), 0)}, KV blocks "
                  f"{_f(peak.get('kv_blocks_used'), 0)} / {_f(peak.get('kv_blocks_total'), 0)}, "
                  f"adapters on device {_f(peak.get('adapters_device'), 0)} "
                  f"(pinned {_f(peak.get('adapters_pinned'), 0)}), "
                  f"in host memory {_f(peak.get('adapters_host'), 0)}, "
                  f"queue {_f(peak.get('queue_depth'), 0)}")
    if "machine" in figures:
        m = figures["machine"]
        dots = f", quantized dots on {m['quantized_dots']}" if m.get("quantized_dots") else ""
        console.print(f"machine: {m.get('processor', '?')}{dots}; "
                      f"GEMM {m['gemm_flop_s'] / 1e9:,.1f} GFLOP/s, "
                      f"copy {m['copy_bytes_s'] / 1e9:,.1f} GB/s ({m['threads']} CPU threads, as the engine)")
        ceil = Table(
            title="linear-layer ceiling (all q/k/v/o/gate/up/down + lm_head, one decode step)"
        )
        for col in ("batch", "step ms", "ceiling tok/s", "roofline ideal ms", "weights MB",
                    "ours % of ceiling", "engine's projections ms"):
            ceil.add_column(col, justify="right")
        ours_tok_s = figures["runs"]["ours"]["output_tok_s"]
        for p in figures["ceiling"]:
            mine = 100 * ours_tok_s / p["tok_s"] if p["batch"] == figures["ceiling_batch"] else None
            ceil.add_row(str(p["batch"]), _f(p["step_ms"], 2), _f(p["tok_s"]), _f(p["ideal_ms"], 2),
                         _f(p["weight_bytes"] / 1e6), _f(mine), _f(p.get("engine_ms"), 2))
        console.print(ceil)
    names = {
        "ours_vs_hf_peft_mixed": "ours / HF+PEFT mixed",
        "ours_vs_hf_no_adapter": "ours / HF no adapter",
        "hf_peft_mixed_vs_hf_no_adapter": "HF+PEFT mixed / HF no adapter",
        "adapters_vs_no_adapter": "ours with adapters / ours no adapter",
        "in_process_vs_engine_process": "ours in process / through an engine process",
        "ours_vs_ceiling": "ours tok/s / linear ceiling tok/s",
        "ours_vs_engine_ceiling": "ours tok/s / own-projection ceiling",
        "step_vs_ceiling_step": "ceiling step ms / ours decode step ms",
        "tpot_vs_batch1_ceiling": "batch-1 ceiling ms / ours TPOT p50",
    }
    times = {
        "ours_vs_llamacpp_distinct": "ours / llama.cpp own adapter each",
        "ours_no_adapter_vs_llamacpp": "ours no adapter / llama.cpp no adapter",
        "llamacpp_tpot_vs_ours": "llama.cpp TPOT / ours (own adapter each)",
        "llamacpp_tpot_vs_ours_no_adapter": "llama.cpp TPOT / ours (no adapter)",
        "ours_prompt_vs_llamacpp": "ours prompt tok/s / llama.cpp (adapters)",
        "ours_no_adapter_prompt_vs_llamacpp": "ours prompt tok/s / llama.cpp (no adapter)",
    }
    for key, label in {**names, **times}.items():
        if key in figures["ratios"]:
            value = figures["ratios"][key]
            console.print(f"  {label:<40} {value:8.2f}x" if key.startswith("ours_vs_hf") or key in times else
                          f"  {label:<40} {100 * value:7.1f}%")
    console.print(f"bench wall time {figures['bench_wall_s']:.0f} s; reproduce with:")
    console.print(figures["command"], markup=False, highlight=False, soft_wrap=True)

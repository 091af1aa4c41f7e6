"""`loraserve loadtest`, for real but small: it starts `loraserve serve` (random:tiny) in a subprocess
with a batch of 4 and a queue of 4, so that 24 streaming clients overflow it, and hangs up on a third
of its requests. Its functional checks (no 5xx, no stream errors or hangs, only 200 or 3040, no leaked KV
blocks or pins, the queue drained) must pass."""

from __future__ import annotations

import json

import pytest

from loraserve.cli import app
from loraserve.tools.loadtest import run as loadtest
from loraserve.tools.loadtest.run import Options, options_from_args
from loraserve.tools.loadtest.server import metric_sum, parse_metrics

MODEL = "@cf/test/tiny-lora=random:tiny"


def test_a_small_overload_run_passes_its_checks() -> None:
    opts = Options(clients=24, duration_s=4.0, warmup_s=1.5, disconnect_p=0.3, model=MODEL, adapters=2,
                   max_batch=4, max_queue=4, max_tokens=(4, 16, 48), settle_s=10.0, startup_timeout_s=120.0,
                   engine_process=True, client_nice=0, unloaded_s=2.0)
    report = loadtest.run(opts)
    # The functional checks only: latency, throughput and memory-growth limits are judged by the full
    # 60 s run (a figure printed by a command), never by a timed test on whatever machine runs the suite.
    timing = {"health_max_under_500ms", "refusals_quick", "rss_growth_under_10pct",
              "throughput_80pct_of_unloaded"}
    assert set(report["checks"]) > timing
    failed = [name for name, ok in report["checks"].items() if name not in timing and not ok]
    assert not failed, json.dumps(report, indent=2)
    requests = report["requests"]
    assert report["responses"].get("429 3040", 0) > 0  # the surplus was refused, not queued
    assert requests["disconnected"] > 0 and requests["completed"] > 0
    assert report["config"]["finetunes"] == 2
    assert report["after"] == {**report["after"], "kv_blocks_used": 0, "adapters_pinned": 0, "queue_depth": 0}
    # /healthz always answered
    assert report["health_ms"]["probes"] >= 8 and report["health_ms"]["failures"] == {}
    assert report["rss_mib"]["after_warmup"] and report["rss_mib"]["end"]
    # Through the engine process: the batch it ran, the same batch unloaded, and who used the cores.
    tokens, cpu = report["tokens"], report["cpu"]
    assert report["config"]["engine_process"] and 0 < tokens["mean_running"] <= 4
    unloaded = tokens["unloaded"]
    assert unloaded["clients"] == round(tokens["mean_running"]) and unloaded["refused"] == 0
    assert unloaded["server_per_s"] > 0 and tokens["share_of_unloaded"] > 0
    assert cpu["server_cores"] > 0 and cpu["loadtest_cores"] > 0 and cpu["machine_cores"] >= 1
    # serve adapts its engine's threads by default, and says how many it stepped with
    assert 1 <= cpu["engine_threads"] <= cpu["machine_cores"]


def test_the_cli_command_parses_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["loadtest", "--help"])
    assert result.exit_code == 0
    assert "--clients" in capsys.readouterr().out + result.output
    assert loadtest.main(["--clients", "0"]) == 2
    assert options_from_args([]).engine_process and options_from_args([]).serve_args == ()
    opts = options_from_args(["--in-process", "--serve-arg=--fixed-threads", "--serve-arg=--engine-nice=0"])
    assert not opts.engine_process and opts.serve_args == ("--fixed-threads", "--engine-nice=0")


def test_parse_metrics() -> None:
    text = (
        "# HELP loraserve_kv_blocks_used Paged KV-cache blocks in use.\n"
        'loraserve_kv_blocks_used{model="a"} 3.0\n'
        'loraserve_kv_blocks_used{model="b"} 2.0\n'
        'loraserve_adapters_resident{model="a",tier="pinned"} 1.0\n'
        'loraserve_adapters_resident{model="a",tier="device"} 4.0\n'
        "loraserve_plain 7\n"
    )
    samples = parse_metrics(text)
    assert metric_sum(samples, "loraserve_kv_blocks_used") == 5
    assert metric_sum(samples, "loraserve_adapters_resident", tier="pinned") == 1
    assert metric_sum(samples, "loraserve_plain") == 7

"""The routing benchmark's figures, tables and options (no Ray: rows made by hand)."""

from __future__ import annotations

import json

import pytest

from loraserve.tools.routing_bench import run as routing_bench
from loraserve.tools.routing_bench.drive import PhaseResult
from loraserve.tools.routing_bench.popularity import Popularity
from loraserve.tools.routing_bench.report import (
    Row,
    load_ratios,
    make_row,
    measured_table,
    percentile,
    replica_figures,
)
from loraserve.tools.routing_bench.run import Options, options_from_args
from loraserve.tools.routing_bench.simulate import Routing


def _row(popularity: Popularity, routing: Routing, loads: float, warmup: bool = False) -> Row:
    phase = PhaseResult(requests=100, ttft_s=[0.1] * 100, tokens=800, wall_s=4.0)
    return make_row(popularity, routing, warmup, phase, loads, loads * 0.002)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) is None


def test_a_row_counts_failures_and_rates() -> None:
    phase = PhaseResult(requests=4, errors={"429 3040": 1}, ttft_s=[0.3, 0.1, 0.2], tokens=24, wall_s=2.0)
    row = make_row(Popularity.UNIFORM, Routing.AFFINITY, False, phase, loads=2, load_s=0.01)
    assert (row.failed, row.loads_per_1000, row.ttft_p50_s, row.ttft_p99_s) == (1, 500.0, 0.2, 0.3)
    assert (row.tokens_per_s, row.requests_per_s) == (12.0, 1.5)


def test_load_ratios_compare_measured_rows_only() -> None:
    rows = [_row(Popularity.UNIFORM, Routing.AFFINITY, 200, warmup=True),
            _row(Popularity.UNIFORM, Routing.AFFINITY, 5),
            _row(Popularity.UNIFORM, Routing.POWER_OF_TWO, 200, warmup=True),
            _row(Popularity.UNIFORM, Routing.POWER_OF_TWO, 40),
            _row(Popularity.POWERLAW, Routing.AFFINITY, 0),
            _row(Popularity.POWERLAW, Routing.POWER_OF_TWO, 30)]
    assert load_ratios(rows) == {Popularity.UNIFORM: 8.0, Popularity.POWERLAW: None}
    bound = "loads, power-of-two / multiplexed, powerlaw: multiplexed loaded none: over 30x"
    assert bound in measured_table(rows)
    figures = replica_figures(rows, replicas=2, resident=120)
    assert figures is not None
    assert figures.requests_per_s == pytest.approx(12.5)  # 25 requests/s over 2 replicas, multiplexed rows
    assert figures.load_s == pytest.approx(0.002)
    assert replica_figures([], 2, 120) is None


def test_the_report_prints_both_tables_and_dumps_json() -> None:
    loads = {Routing.AFFINITY: 4, Routing.POWER_OF_TWO: 40}
    rows = [_row(p, r, loads[r]) for p in Popularity for r in Routing]
    opts = Options(sim_adapters=(300,), sim_rate=20.0)
    report = routing_bench.report(opts, rows)
    text = "\n".join(report.lines())
    assert "loads, power-of-two / multiplexed, uniform: 10.0x" in text
    assert "simulated: 20 requests/s" in text
    assert len(report.sims) == len(Popularity) * len(Routing)
    dumped = json.loads(json.dumps(report.as_json()))
    assert dumped["load_ratio"] == {"uniform": 10.0, "powerlaw": 10.0}
    assert {sim["adapters"] for sim in dumped["simulation"]} == {300}
    assert all(sim["to_hold_all"] == 3 for sim in dumped["simulation"])


def test_options_are_checked() -> None:
    assert options_from_args(["--popularity", "powerlaw", "--sim-adapters", "10,20"]).popularities == (
        Popularity.POWERLAW,)
    for argv in (["--replicas", "0"], ["--model", "@cf/test/x=/no/such/dir"], ["--sim-rate", "0"],
                 ["--sim-adapters", "x"]):
        with pytest.raises(SystemExit):
            options_from_args(argv)
    assert routing_bench.main(["--adapters", "0"]) == 2

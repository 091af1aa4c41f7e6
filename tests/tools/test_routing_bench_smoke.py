"""`loraserve bench-routing` for real but small: a Ray started here, one engine replica of random:tiny per
application, 20 finetunes of which the replica holds 12, 40 measured requests per routing, one popularity.
Only what must hold whatever the timing is checked: every request streamed, each routing's fresh
application loaded each adapter once in its warm-up pass (cold caches, counted by the engine), and the
report holds both tables."""

from __future__ import annotations

import json

import pytest

from loraserve.tools.routing_bench.popularity import Popularity
from loraserve.tools.routing_bench.run import Options, run
from loraserve.tools.routing_bench.simulate import Routing

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'loraserve[cluster]'")


def test_a_small_routing_run_measures_both_routings() -> None:
    opts = Options(replicas=1, adapters=20, resident=12, requests=40, concurrency=4, max_tokens=4,
                   popularities=(Popularity.POWERLAW,), sim_adapters=(100,), sim_rate=20.0)
    report = run(opts)
    assert [(row.routing, row.warmup) for row in report.rows] == [
        (Routing.AFFINITY, True), (Routing.AFFINITY, False), (Routing.POWER_OF_TWO, True),
        (Routing.POWER_OF_TWO, False)]
    for row in report.rows:
        assert row.failed == 0, row
        assert row.ttft_p50_s is not None and row.tokens_per_s > 0
        assert 0 <= row.loads <= row.requests
    # 20 distinct adapters, none resident: every warm-up request loads, and takes the loader some time.
    assert [row.loads for row in report.rows if row.warmup] == [20, 20]
    assert all(row.load_s > 0 for row in report.rows if row.warmup)
    assert report.figures is not None and report.figures.resident == 12
    text = "\n".join(report.lines())
    assert "loads, power-of-two / multiplexed, powerlaw:" in text and "simulated: 20 requests/s" in text
    assert len(json.loads(json.dumps(report.as_json()))["simulation"]) == len(Routing)

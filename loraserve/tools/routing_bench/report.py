"""The benchmark's figures and tables: one row per (popularity, routing, phase), the ratio of adapter loads
(power of two over multiplexed) per popularity, and the simulation's replica counts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraserve.tools.routing_bench.drive import PhaseResult
from loraserve.tools.routing_bench.popularity import Popularity
from loraserve.tools.routing_bench.simulate import Outcome, ReplicaFigures, Routing, Scenario


@dataclass(frozen=True)
class Row:
    popularity: Popularity
    routing: Routing
    warmup: bool  # the first pass (one request per adapter, caches cold): not in the figures compared
    requests: int
    failed: int
    loads: float  # adapter loads from disk, summed over the replicas
    load_s: float  # seconds the replicas' loaders spent on them
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tokens_per_s: float
    requests_per_s: float

    @property
    def loads_per_1000(self) -> float:
        return 1000.0 * self.loads / self.requests if self.requests else 0.0

    def as_json(self) -> dict[str, Any]:
        return {"popularity": self.popularity.value, "routing": self.routing.value,
                "phase": "warm-up" if self.warmup else "measured", "requests": self.requests,
                "failed": self.failed, "adapter_loads": self.loads, "adapter_load_seconds": self.load_s,
                "loads_per_1000": self.loads_per_1000, "ttft_p50_s": self.ttft_p50_s,
                "ttft_p99_s": self.ttft_p99_s, "tokens_per_s": self.tokens_per_s,
                "requests_per_s": self.requests_per_s}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least a share q of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def make_row(popularity: Popularity, routing: Routing, warmup: bool, phase: PhaseResult, loads: float,
             load_s: float) -> Row:
    wall = max(phase.wall_s, 1e-9)
    return Row(popularity, routing, warmup, phase.requests, sum(phase.errors.values()), loads, load_s,
               percentile(phase.ttft_s, 0.50), percentile(phase.ttft_s, 0.99), phase.tokens / wall,
               len(phase.ttft_s) / wall)


def load_ratios(rows: Sequence[Row]) -> dict[Popularity, float | None]:
    """Measured loads per 1,000 requests, power of two over multiplexed (None: multiplexed loaded none)."""
    ratios: dict[Popularity, float | None] = {}
    for popularity in dict.fromkeys(row.popularity for row in rows):
        per = {row.routing: row.loads_per_1000 for row in rows
               if row.popularity is popularity and not row.warmup}
        if len(per) == len(Routing):
            mine = per[Routing.AFFINITY]
            ratios[popularity] = per[Routing.POWER_OF_TWO] / mine if mine else None
    return ratios


def replica_figures(rows: Sequence[Row], replicas: int, resident: int) -> ReplicaFigures | None:
    """One replica's figures for the simulation: requests per second from the multiplexed runs (few
    loads; the closed loop kept the replicas busy), one load's time from every run's loads."""
    rates = [row.requests_per_s for row in rows if row.routing is Routing.AFFINITY and not row.warmup]
    loads = sum(row.loads for row in rows)
    if not rates or not all(rate > 0 for rate in rates):
        return None
    return ReplicaFigures(sum(rates) / len(rates) / replicas,
                          sum(row.load_s for row in rows) / loads if loads else 0.0, resident)


@dataclass(frozen=True)
class SimRow:
    scenario: Scenario
    routing: Routing
    outcome: Outcome
    to_hold_all: int  # replicas whose residency together holds every adapter

    def as_json(self) -> dict[str, Any]:
        s, o = self.scenario, self.outcome
        return {"adapters": s.adapters, "popularity": s.popularity.value, "alpha": s.alpha, "rate": s.rate,
                "routing": self.routing.value, "replicas": o.replicas, "loads_per_1000": o.loads_per_1000,
                "wait_p99_s": o.wait_p99_s, "utilization": o.utilization, "to_hold_all": self.to_hold_all}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def measured_table(rows: Sequence[Row]) -> list[str]:
    lines = [f"{'routing':<13} {'popularity':<10} {'phase':<8} {'requests':>8} {'failed':>6} {'loads':>6} "
             f"{'loads/1k':>8} {'ttft p50':>8} {'ttft p99':>8} {'tok/s':>7} {'req/s':>6}"]
    for r in rows:
        phase = "warm-up" if r.warmup else "measured"
        lines.append(f"{r.routing.value:<13} {r.popularity.value:<10} {phase:<8} "
                     f"{r.requests:>8} {r.failed:>6} {r.loads:>6.0f} {r.loads_per_1000:>8.1f} "
                     f"{_ms(r.ttft_p50_s):>6}ms {_ms(r.ttft_p99_s):>6}ms {r.tokens_per_s:>7.1f} "
                     f"{r.requests_per_s:>6.1f}")
    for popularity, ratio in load_ratios(rows).items():
        if ratio is None:  # a bound instead: had multiplexed loaded once, the ratio would be this
            blind = sum(r.loads for r in rows if r.popularity is popularity and not r.warmup
                        and r.routing is Routing.POWER_OF_TWO)
            said = f"multiplexed loaded none: over {blind:.0f}x"
        else:
            said = f"{ratio:.1f}x"
        lines.append(f"loads, power-of-two / multiplexed, {popularity.value}: {said}")
    return lines


def simulation_table(figures: ReplicaFigures, sims: Sequence[SimRow]) -> list[str]:
    if not sims:
        return []
    s = sims[0].scenario
    lines = [f"simulated: {s.rate:g} requests/s; one replica {figures.requests_per_s:.1f} requests/s, "
             f"{figures.load_s * 1e3:.2f} ms a load, {figures.resident} adapters resident; "
             f"enough = p99 wait <= {s.max_wait_s:g} s",
             f"{'adapters':>8} {'popularity':<10} {'routing':<13} {'replicas':>8} {'loads/1k':>8} "
             f"{'wait p99':>8} {'busy':>5} {'to hold all':>11}"]
    for row in sims:
        o = row.outcome
        s = row.scenario
        lines.append(f"{s.adapters:>8} {s.popularity.value:<10} {row.routing.value:<13} "
                     f"{o.replicas:>8} {o.loads_per_1000:>8.1f} {_ms(o.wait_p99_s):>6}ms "
                     f"{o.utilization:>5.0%} {row.to_hold_all:>11}")
    return lines


@dataclass(frozen=True)
class Report:
    settings: dict[str, Any]  # the run's options
    rows: list[Row]
    figures: ReplicaFigures | None  # None when no multiplexed run completed a request
    sims: list[SimRow]

    def as_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "measured": [row.as_json() for row in self.rows],
                "load_ratio": {p.value: ratio for p, ratio in load_ratios(self.rows).items()},
                "replica_figures": None if self.figures is None else vars(self.figures),
                "simulation": [sim.as_json() for sim in self.sims]}

    def lines(self) -> list[str]:
        s = self.settings
        lines = [f"{s['replicas']} engine replicas of {s['model']}, {s['adapters']} adapters, "
                 f"{s['resident']} resident per replica, {s['requests']} measured requests per run, "
                 f"{s['concurrency']} streams, max_tokens {s['max_tokens']}; warm-up rows: one request per "
                 "adapter from cold caches, not compared", *measured_table(self.rows)]
        if self.figures is not None:
            lines += ["", *simulation_table(self.figures, self.sims)]
        return lines

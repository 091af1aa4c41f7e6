"""`loraserve bench-routing`: adapter loads per 1,000 requests and TTFT with multiplexed (adapter-affinity)
routing against Ray Serve's plain power-of-two routing, in one run, on a Ray started here.

For each popularity (uniform, power law), the same seeded request sequence runs twice: first with
affinity, then without, each on a freshly deployed application (cold caches). Each run starts with a
warm-up pass, one request per adapter in a seeded order, reported on a row of its own and left out of the
comparison; then the measured requests. Each replica holds `--resident` adapters (Serve's multiplexing
LRU, which also drops evicted adapters from the engine): with fewer than `--adapters`, placement matters.
Adapter loads are the engines' own counter (`loraserve_adapter_loads`), read from the gateway's /metrics,
which sums the replicas. Then the simulation (simulate.py), fed by the measured per-replica figures,
estimates the replicas needed for more active adapters at `--sim-rate`.

Adapters are synthetic (registry/synth.py, as `loraserve loadtest` writes them), so the model's source
must be `random:NAME` or `embedded`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraserve import catalog
from loraserve.tools.loadtest.server import SetupError, model_id, register_adapters, write_adapters
from loraserve.tools.routing_bench.cluster import Deployment, application, local_serve, read_loads
from loraserve.tools.routing_bench.drive import BenchRequest, drive
from loraserve.tools.routing_bench.popularity import Popularity, draw
from loraserve.tools.routing_bench.report import (
    Report,
    Row,
    SimRow,
    make_row,
    replica_figures,
)
from loraserve.tools.routing_bench.simulate import Routing, Scenario, replicas_needed

ACCOUNT = "routing-bench"
# random:tiny served under a LoRA-capable catalog id (its chat template), as the cluster tests do.
DEFAULT_MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora=random:tiny"
_WORDS = ("tell", "me", "about", "the", "river", "city", "night", "light", "story", "old", "new", "small",
          "green", "house", "road", "music", "friend", "winter", "summer", "ocean", "why", "how", "a", "of")


@dataclass(frozen=True)
class Options:
    replicas: int = 2
    adapters: int = 200
    resident: int = 120  # adapters per replica
    requests: int = 1000  # measured, per popularity and routing
    concurrency: int = 8
    max_tokens: int = 8
    max_batch: int = 8  # the engine's running batch (max_num_seqs)
    popularities: tuple[Popularity, ...] = (Popularity.UNIFORM, Popularity.POWERLAW)
    alpha: float = 1.0
    model: str = DEFAULT_MODEL
    engine_cpus: float = 1.0  # Ray's logical CPUs per engine replica (also its torch threads)
    seed: int = 0
    sim_rate: float = 100.0
    sim_adapters: tuple[int, ...] = (1000, 10000)
    sim_max_wait_s: float = 1.0
    sim_load_s: float | None = None  # one adapter load in the simulation; None: the measured time
    as_json: bool = False

    def __post_init__(self) -> None:
        for name in ("replicas", "adapters", "resident", "requests", "concurrency", "max_tokens",
                     "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.popularities:
            raise ValueError("--popularity names none")
        if self.alpha < 0:
            raise ValueError("--alpha must be >= 0")
        if not self.engine_cpus > 0:
            raise ValueError("--engine-cpus must be > 0")
        if self.sim_load_s is not None and not self.sim_load_s >= 0:
            raise ValueError("--sim-load must be >= 0")
        if any(count < 1 for count in self.sim_adapters):
            raise ValueError("--sim-adapters must be >= 1 each")
        Scenario(self.sim_rate, 1, Popularity.UNIFORM, max_wait_s=self.sim_max_wait_s,
                 spill_s=self.sim_max_wait_s / 2)  # its own checks of the rate and the wait
        if catalog.known_shape(catalog.parse_model_arg(self.model).source) is None:
            raise ValueError("--model: synthetic adapters need a random:NAME or embedded source")


def requests_for(opts: Options, popularity: Popularity, names: list[str]) -> tuple[list[BenchRequest],
                                                                                     list[BenchRequest]]:
    """The warm-up pass and the measured sequence, the same for both routings."""
    rng = random.Random(f"{opts.seed}-{popularity.value}")

    def prompt() -> str:
        return " ".join(rng.choices(_WORDS, k=rng.randint(6, 20)))

    order = list(range(len(names)))
    rng.shuffle(order)
    warmup = [BenchRequest(names[i], prompt()) for i in order]
    picks = draw(popularity, len(names), opts.alpha, opts.requests, rng)
    return warmup, [BenchRequest(names[i], prompt()) for i in picks]


def run(opts: Options) -> Report:
    from loraserve.cluster.local import local_cpus
    from loraserve.registry import Registry

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="loraserve-routing-bench-") as tmp:
        data_dir = Path(tmp)
        with Registry.open(data_dir) as registry:
            token = registry.create_token(ACCOUNT, "routing benchmark")
        folders = write_adapters(opts.model, opts.adapters, opts.seed, data_dir / "adapters")
        deployment = Deployment(opts.model, data_dir, opts.replicas, opts.resident, opts.adapters,
                                opts.max_batch, opts.engine_cpus)
        names: list[str] = []
        with local_serve(local_cpus(deployment.config(True), 1)) as url, httpx.Client(timeout=30.0) as http:
            run_url = f"{url}/client/v4/accounts/{ACCOUNT}/ai/run/{model_id(opts.model)}"
            for popularity in opts.popularities:
                for routing in Routing:
                    with application(deployment.config(routing is Routing.AFFINITY)):
                        if not names:
                            _log(f"registering {opts.adapters} finetunes ...")
                            names = register_adapters(ACCOUNT, opts.model, url, token, folders)
                        warmup, measured = requests_for(opts, popularity, names)
                        _log(f"{popularity.value}, {routing.value}: {len(warmup)} warm-up and "
                             f"{len(measured)} measured requests ...")
                        before = read_loads(http, url)
                        for is_warmup, requests in ((True, warmup), (False, measured)):
                            phase = drive(run_url, token, requests, opts.max_tokens, opts.concurrency)
                            after = read_loads(http, url)
                            rows.append(make_row(popularity, routing, is_warmup, phase,
                                                 after.loads - before.loads, after.seconds - before.seconds))
                            before = after
    return report(opts, rows)


def report(opts: Options, rows: list[Row]) -> Report:
    """The measured rows, and the simulation fed by their figures."""
    figures = replica_figures(rows, opts.replicas, opts.resident)
    if figures is not None and opts.sim_load_s is not None:
        figures = dataclasses.replace(figures, load_s=opts.sim_load_s)
    sims: list[SimRow] = []
    if figures is not None:
        for adapters in opts.sim_adapters:
            for popularity in opts.popularities:
                scenario = Scenario(opts.sim_rate, adapters, popularity, opts.alpha,
                                    max_wait_s=opts.sim_max_wait_s, spill_s=opts.sim_max_wait_s / 2,
                                    seed=opts.seed)
                for routing in Routing:
                    sims.append(SimRow(scenario, routing, replicas_needed(figures, scenario, routing),
                                       math.ceil(adapters / opts.resident)))
    settings = {"replicas": opts.replicas, "adapters": opts.adapters, "resident": opts.resident,
                "requests": opts.requests, "concurrency": opts.concurrency, "max_tokens": opts.max_tokens,
                "max_batch": opts.max_batch, "alpha": opts.alpha, "model": opts.model,
                "engine_cpus": opts.engine_cpus, "seed": opts.seed}
    return Report(settings, rows, figures, sims)


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="loraserve bench-routing", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Adapter loads and TTFT, multiplexed against power-of-two routing, on a local Ray; "
                    "then simulated replica counts for more adapters.")
    p.add_argument("--replicas", type=int, default=d.replicas, help="engine replicas")
    p.add_argument("--adapters", type=int, default=d.adapters, help="synthetic finetunes requests name")
    p.add_argument("--resident", type=int, default=d.resident, help="adapters one replica holds")
    p.add_argument("--requests", type=int, default=d.requests,
                   help="measured requests per popularity and routing (after the warm-up pass)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="streams in flight")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="the engines' running batch")
    p.add_argument("--popularity", choices=[p.value for p in Popularity], action="append",
                   help="uniform and/or powerlaw (repeatable; default both)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="the power law's (Zipf) exponent")
    p.add_argument("--model", default=d.model, help="ID=SOURCE, SOURCE random:NAME or embedded")
    p.add_argument("--engine-cpus", type=float, default=d.engine_cpus, help="Ray CPUs per engine replica")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sim-rate", type=float, default=d.sim_rate, help="simulated requests per second")
    p.add_argument("--sim-adapters", default=",".join(map(str, d.sim_adapters)),
                   help="comma-separated active adapter counts to simulate")
    p.add_argument("--sim-max-wait", type=float, default=d.sim_max_wait_s,
                   help="p99 wait (s) a simulated replica count must keep to")
    p.add_argument("--sim-load", type=float, default=None,
                   help="seconds one adapter load takes in the simulation (default: the measured time)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def options_from_args(argv: list[str] | None = None) -> Options:
    ns = build_parser().parse_args(argv)
    try:
        sim_adapters = tuple(int(x) for x in ns.sim_adapters.split(",") if x.strip())
        chosen = dict.fromkeys(ns.popularity or [])
        popularities = tuple(Popularity(v) for v in chosen) or Options.popularities
        return Options(replicas=ns.replicas, adapters=ns.adapters, resident=ns.resident, requests=ns.requests,
                       concurrency=ns.concurrency, max_tokens=ns.max_tokens, max_batch=ns.max_batch,
                       popularities=popularities, alpha=ns.alpha, model=ns.model, engine_cpus=ns.engine_cpus,
                       seed=ns.seed, sim_rate=ns.sim_rate, sim_adapters=sim_adapters,
                       sim_max_wait_s=ns.sim_max_wait, sim_load_s=ns.sim_load, as_json=ns.json)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    try:
        opts = options_from_args(argv)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        if isinstance(exc.code, int):
            return exc.code
        _log(f"bench-routing: {exc.code}")
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        _log("bench-routing runs on Ray Serve: pip install 'loraserve[cluster]'")
        return 2
    try:
        result = run(opts)
    except (SetupError, httpx.HTTPError, OSError, TimeoutError) as exc:
        _log(f"bench-routing: {exc}")
        return 2
    print(json.dumps(result.as_json(), indent=2) if opts.as_json else "\n".join(result.lines()))
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

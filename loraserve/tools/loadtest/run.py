"""`loraserve loadtest`: a bounded overload run against a live server.

C closed-loop clients stream /run for D seconds (random prompts and lengths, some with a finetune); a
share of them hang up after a random number of events, or while still queued. A prober times
/healthz every 0.25 s on a fresh connection. When the clients stop, the run waits for the server to
go idle and reads /metrics: nothing may stay allocated (KV blocks, adapter pins, queue). The
server's resident memory is read from /proc/PID/status.

By default it starts `loraserve serve` itself on a free loopback port, with a temporary data dir, a
token and a few synthetic finetunes (registry/synth.py) and no rate limit; `--url` (with `--account`
and `--token`) targets a running server instead. No torch here: the client should take as little
of the machine from the server as it can.

Exit status: 0 when every check passed, 1 when one failed, 2 when the run could not be set up.
The server side (process, finetunes, /metrics) is in loadtest_server.py, the clients in loadtest_clients.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loraserve import catalog
from loraserve.tools.loadtest.clients import LoadClients
from loraserve.tools.loadtest.report import Measured, print_report, summarize
from loraserve.tools.loadtest.server import (
    HealthProber,
    ServerProcess,
    SetupError,
    read_state,
    register_adapters,
    rss_kib,
    settled_state,
    write_adapters,
)
from loraserve.tools.loadtest.unloaded import BatchSampler, CpuMeter, unloaded_throughput

ACCOUNT = "loadtest"
MAX_TOKENS = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Options:
    clients: int = 200
    duration_s: float = 60.0
    warmup_s: float | None = None  # default: a sixth of the run, at most 10 s
    disconnect_p: float = 0.3
    lora_p: float = 0.5
    adapters: int = 3
    model: str = catalog.DEFAULT_MODEL.id
    url: str | None = None
    account: str = ACCOUNT
    token: str | None = None
    server_pid: int | None = None
    max_batch: int | None = None
    max_queue: int | None = 64
    max_tokens: tuple[int, ...] = MAX_TOKENS
    backoff_s: float = 0.5
    health_interval_s: float = 0.25
    settle_s: float = 10.0
    read_timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    server_log: Path | None = None
    seed: int = 0
    as_json: bool = False
    engine_process: bool = True  # serve's engine in a process of its own, else --in-process (started server)
    serve_args: tuple[str, ...] = ()  # more `loraserve serve` options (started server only)
    # The load generator runs at this niceness so that it yields the cores to the server it measures.
    client_nice: int = 10
    unloaded_s: float = 15.0  # the unloaded run at the loaded batch; 0 skips it

    def __post_init__(self) -> None:
        if not 0 <= self.client_nice <= 19:
            raise ValueError(f"client_nice must be in [0, 19], got {self.client_nice}")
        if self.unloaded_s < 0:
            raise ValueError(f"unloaded_s must be >= 0, got {self.unloaded_s}")

    @property
    def warmup(self) -> float:
        return min(10.0, self.duration_s / 6) if self.warmup_s is None else self.warmup_s


# -- the run -----------------------------------------------------------------------------------------


def run(opts: Options) -> dict[str, Any]:
    pid: int | None
    with contextlib.ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraserve-loadtest-")))
        if opts.url is None:
            from loraserve.registry import Registry

            with Registry.open(data_dir) as registry:
                token = registry.create_token(opts.account, "loadtest")
            _log(f"starting loraserve serve --model {opts.model} ...")
            extra = ["--engine-process" if opts.engine_process else "--in-process", *opts.serve_args]
            proc = ServerProcess(opts.model, opts.max_batch, opts.max_queue, data_dir, extra)
            if opts.server_log is not None:  # copied once the server has stopped (callbacks run last first)
                stack.callback(shutil.copyfile, proc.log_path, opts.server_log)
            stack.callback(proc.stop)
            proc.wait_ready(opts.startup_timeout_s)
            url, pid = proc.url, proc.pid
        else:
            if opts.token is None:
                raise SetupError("--url needs --token (and --account)")
            url, pid, token = opts.url.rstrip("/"), opts.server_pid, opts.token
        folders = write_adapters(opts.model, opts.adapters, opts.seed, data_dir / "adapters")
        finetunes = register_adapters(opts.account, opts.model, url, token, folders)
        server = {"url": url, "pid": pid, "finetunes": len(finetunes)}
        _log(f"{url}: {opts.clients} clients for {opts.duration_s:g} s, {len(finetunes)} finetunes")
        report = _measure(opts, url, pid, token, finetunes, server)
        if opts.url is None and not report["passed"]:
            report["server_log_tail"] = proc.log_tail(40)
        return report
    raise AssertionError("unreachable")  # pragma: no cover (for mypy: ExitStack may swallow)


def _measure(opts: Options, url: str, pid: int | None, token: str, finetunes: list[str],
             server: dict[str, Any]) -> dict[str, Any]:
    rss: dict[str, int | None] = {"start": rss_kib(pid)}
    with httpx.Client(timeout=10.0) as http:
        before = read_state(http, url)
    # The server was started before this: it keeps its priority. Linux applies nice per thread, and
    # the prober's and sampler's threads, started below, inherit this one's.
    if (more := opts.client_nice - os.getpriority(os.PRIO_PROCESS, 0)) > 0:
        os.nice(more)
    clients = LoadClients(opts, url, token, finetunes)
    prober = HealthProber(url, opts.health_interval_s, pid)
    prober.start()
    sampler = BatchSampler(url)
    sampler.start()
    cpu_meter = CpuMeter(pid)

    def at_warmup_end() -> None:
        rss["after_warmup"] = rss_kib(pid)

    timer = threading.Timer(opts.warmup, at_warmup_end)
    timer.start()
    started = time.monotonic()
    try:
        asyncio.run(clients.run(opts.duration_s))
    finally:
        timer.cancel()
        elapsed = time.monotonic() - started
        cpu = cpu_meter.stop()
        mean_running = sampler.stop()
        cpu["engine_threads"] = sampler.mean_threads()
        after, settle_s = settled_state(url, opts.settle_s)
        prober.stop()
    rss["end"] = rss_kib(pid)
    rss["peak"] = prober.rss_peak_kib
    rss.setdefault("after_warmup", None)
    unloaded = None
    if opts.unloaded_s > 0 and mean_running:
        batch = max(1, round(mean_running))
        _log(f"unloaded: {batch} clients for {opts.unloaded_s:g} s ...")
        unloaded = unloaded_throughput(opts, url, pid, token, finetunes, batch)
    measured = Measured(before, after, settle_s, rss, elapsed, server, mean_running, cpu, unloaded)
    return summarize(opts, clients.tally, prober, measured)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="loraserve loadtest", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Overload a server with streaming clients that hang up at random, and check that health "
                    "stays fast, surplus is refused with 3040, nothing leaks and memory stays flat.",
    )
    p.add_argument("--clients", "-c", type=int, default=d.clients, help="concurrent streaming clients")
    p.add_argument("--duration", "-d", type=float, default=d.duration_s, help="seconds of load")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS baseline is taken; none: a sixth of the run, at most 10")
    p.add_argument("--disconnect", type=float, default=d.disconnect_p,
                   help="probability that a request is hung up on, after 0..24 events")
    p.add_argument("--lora", type=float, default=d.lora_p, help="share of requests that use a finetune")
    p.add_argument("--adapters", type=int, default=d.adapters, help="synthetic finetunes to register")
    p.add_argument("--model", default=d.model,
                   help="ID=SOURCE as for `loraserve serve` (default: the embedded SmolLM2); "
                        "with --url, the id to run (and SOURCE, if known, for the finetunes' shapes)")
    p.add_argument("--max-tokens", default=",".join(map(str, d.max_tokens)),
                   help="comma-separated max_tokens values to pick from")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="serve --max-batch (started server only)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="serve --max-queue (started server only); below clients - batch, "
                        "so that surplus exists")
    p.add_argument("--backoff", type=float, default=d.backoff_s,
                   help="mean seconds a refused client waits")
    p.add_argument("--settle", type=float, default=d.settle_s,
                   help="seconds to wait for the server to go idle")
    p.add_argument("--url", default=None, help="a running server instead of starting one")
    p.add_argument("--account", default=d.account, help="account id (with --url)")
    p.add_argument("--token", default=os.environ.get("LORASERVE_TOKEN"), help="API token (with --url)")
    p.add_argument("--pid", type=int, default=None, help="the --url server's process id, for its RSS")
    p.add_argument("--server-log", type=Path, default=None, help="keep the started server's log here")
    p.add_argument("--in-process", dest="engine_process", action="store_false",
                   help="serve --in-process: the engine in the HTTP server's process (started server only)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="one more `loraserve serve` argument, e.g. --serve-arg=--engine-nice=0 (started "
                        "server only; repeat for more)")
    p.add_argument("--client-nice", type=int, default=d.client_nice,
                   help="niceness of the load generator, so that it yields the cores to the server")
    p.add_argument("--unloaded", type=float, default=d.unloaded_s,
                   help="seconds of the unloaded run at the loaded batch, after the load; 0 skips it")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def options_from_args(argv: list[str] | None = None) -> Options:
    ns = build_parser().parse_args(argv)
    try:
        max_tokens = tuple(int(x) for x in ns.max_tokens.split(",") if x.strip())
    except ValueError:
        raise SystemExit("--max-tokens: comma-separated integers") from None
    if ns.clients < 1 or ns.duration <= 0 or not 0 <= ns.disconnect <= 1 or not max_tokens:
        raise SystemExit(
            "--clients >= 1, --duration > 0, 0 <= --disconnect <= 1 and --max-tokens are required"
        )
    try:
        return Options(
        clients=ns.clients, duration_s=ns.duration, warmup_s=ns.warmup, disconnect_p=ns.disconnect,
        lora_p=ns.lora, adapters=ns.adapters, model=ns.model, url=ns.url, account=ns.account, token=ns.token,
        server_pid=ns.pid, max_batch=ns.max_batch, max_queue=ns.max_queue, max_tokens=max_tokens,
        backoff_s=ns.backoff, settle_s=ns.settle, seed=ns.seed, as_json=ns.json, server_log=ns.server_log,
        engine_process=ns.engine_process, serve_args=tuple(ns.serve_arg), client_nice=ns.client_nice,
        unloaded_s=ns.unloaded,
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    try:
        opts = options_from_args(argv)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        if isinstance(exc.code, int):
            return exc.code
        _log(f"loadtest: {exc.code}")
        return 2
    try:
        report = run(opts)
    except (SetupError, httpx.HTTPError, OSError) as exc:
        _log(f"loadtest: {exc}")
        return 2
    if opts.as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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
from loraserve.tools.loadtest.clients import LoadClients, Tally
from loraserve.tools.loadtest.server import (
    HealthProber,
    ServerProcess,
    ServerState,
    SetupError,
    read_state,
    register_adapters,
    rss_kib,
    settled_state,
    write_adapters,
)

ACCOUNT = "loadtest"
MAX_TOKENS = (8, 16, 32, 64, 128)
HEALTH_LIMIT_S = 1.0
REFUSAL_LIMIT_S = 1.0  # 3040 must come at once, not after queueing
RSS_GROWTH_LIMIT = 0.10


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

    @property
    def warmup(self) -> float:
        return min(10.0, self.duration_s / 6) if self.warmup_s is None else self.warmup_s


# -- the run -----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize(opts: Options, tally: Tally, prober: HealthProber, before: ServerState | None,
              after: ServerState, settle_s: float, rss: dict[str, int | None], elapsed_s: float,
              server: dict[str, Any]) -> dict[str, Any]:
    t = tally
    refused_3040 = t.responses.get("429 3040", 0)
    fivexx = sum(n for key, n in t.responses.items() if key.startswith("5"))
    unexpected = {
        k: n for k, n in t.responses.items() if k not in ("200", "429 3040") and not k.startswith("5")
    }
    growth = None
    if rss.get("after_warmup") and rss.get("end") is not None:
        growth = (rss["end"] or 0) / (rss["after_warmup"] or 1) - 1
    server_tokens = None if before is None else after.generation_tokens - before.generation_tokens
    health_max = max(prober.latencies, default=None)
    checks = {
        "health_max_under_1s": health_max is not None and health_max < HEALTH_LIMIT_S and not prober.failures,
        "no_5xx": fivexx == 0 and not after.new_5xx(before),
        "no_stream_errors": not t.stream_errors and not t.truncated and after.engine_errors == (
            before.engine_errors if before else 0),
        "no_hangs": t.hangs == 0 and not t.transport_errors,
        "only_200_or_3040": not unexpected,
        "refusals_quick": (percentile(t.refusal_s, 99) or 0.0) < REFUSAL_LIMIT_S,
        "no_kv_leak": after.kv_blocks_used == 0,
        "no_pin_leak": after.adapters_pinned == 0,
        "queue_drained": after.queue_depth == 0 and after.running == 0,
        "rss_growth_under_10pct": growth is None or growth < RSS_GROWTH_LIMIT,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "config": {"clients": opts.clients, "duration_s": opts.duration_s, "warmup_s": opts.warmup,
                   "disconnect_p": opts.disconnect_p, "lora_p": opts.lora_p, "model": opts.model,
                   "max_tokens": list(opts.max_tokens), "max_batch": opts.max_batch,
                   "max_queue": opts.max_queue, **server},
        "requests": {"started": t.started, "completed": t.completed, "disconnected": t.disconnected,
                     "cut_at_end": t.cut_at_end, "refused_3040": refused_3040, "hangs": t.hangs,
                     "truncated": t.truncated},
        "responses": dict(sorted(t.responses.items())),
        "stream_errors": dict(t.stream_errors),
        "server_5xx": after.new_5xx(before),
        "transport_errors": dict(t.transport_errors),
        "tokens": {"received": t.tokens, "received_per_s": round(t.tokens / elapsed_s, 1),
                   "server_generated": server_tokens,
                   "server_per_s": None if server_tokens is None else round(server_tokens / elapsed_s, 1)},
        "ttft_ms": {"p50": _ms(percentile(t.ttft_s, 50)), "p99": _ms(percentile(t.ttft_s, 99)),
                    "max": _ms(max(t.ttft_s, default=None))},
        "refusal_ms": {"p50": _ms(percentile(t.refusal_s, 50)), "p99": _ms(percentile(t.refusal_s, 99)),
                       "max": _ms(max(t.refusal_s, default=None))},
        "health_ms": {"probes": len(prober.latencies), "failures": dict(prober.failures),
                      "p50": _ms(percentile(prober.latencies, 50)),
                      "p99": _ms(percentile(prober.latencies, 99)), "max": _ms(health_max)},
        "after": {"settle_s": round(settle_s, 2), "kv_blocks_used": after.kv_blocks_used,
                  "adapters_pinned": after.adapters_pinned, "queue_depth": after.queue_depth,
                  "running": after.running},
        "rss_mib": {k: None if v is None else round(v / 1024, 1) for k, v in rss.items()},
        "rss_growth_pct": None if growth is None else round(growth * 100, 2),
        "elapsed_s": round(elapsed_s, 1),
    }


def run(opts: Options) -> dict[str, Any]:
    pid: int | None
    with contextlib.ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraserve-loadtest-")))
        if opts.url is None:
            from loraserve.registry import Registry

            with Registry.open(data_dir) as registry:
                token = registry.create_token(opts.account, "loadtest")
            _log(f"starting loraserve serve --model {opts.model} ...")
            proc = ServerProcess(opts.model, opts.max_batch, opts.max_queue, data_dir)
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
    clients = LoadClients(opts, url, token, finetunes)
    prober = HealthProber(url, opts.health_interval_s, pid)
    prober.start()

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
        after, settle_s = settled_state(url, opts.settle_s)
        prober.stop()
    rss["end"] = rss_kib(pid)
    rss["peak"] = prober.rss_peak_kib
    rss.setdefault("after_warmup", None)
    return summarize(opts, clients.tally, prober, before, after, settle_s, rss, elapsed, server)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def print_report(report: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    r, t, h, a = report["requests"], report["ttft_ms"], report["health_ms"], report["after"]
    tok, rss, ref = report["tokens"], report["rss_mib"], report["refusal_ms"]
    lines = [
        f"loadtest: {report['config']['clients']} clients, {report['elapsed_s']} s, "
        f"model {report['config']['model']}",
        f"requests     started {r['started']}, completed {r['completed']}, disconnected {r['disconnected']}, "
        f"cut at end {r['cut_at_end']}, hangs {r['hangs']}, truncated {r['truncated']}",
        "responses    " + ", ".join(f"{k}: {n}" for k, n in report["responses"].items())
        + (f"; stream errors {report['stream_errors']}" if report["stream_errors"] else "")
        + (f"; transport errors {report['transport_errors']}" if report["transport_errors"] else "")
        + (f"; server-side 5xx {report['server_5xx']}" if report["server_5xx"] else ""),
        f"refusals     3040 x{r['refused_3040']}, answered in p50 {_fmt(ref['p50'])} ms, "
        f"p99 {_fmt(ref['p99'])} ms",
        f"tokens       {tok['received']} received ({tok['received_per_s']}/s); server generated "
        f"{_fmt(tok['server_generated'])} ({_fmt(tok['server_per_s'])}/s)",
        f"ttft         p50 {_fmt(t['p50'])} ms, p99 {_fmt(t['p99'])} ms, max {_fmt(t['max'])} ms",
        f"health       {h['probes']} probes, p50 {_fmt(h['p50'])} ms, p99 {_fmt(h['p99'])} ms, "
        f"max {_fmt(h['max'])} ms"
        + (f", failures {h['failures']}" if h["failures"] else ""),
        f"after        kv blocks used {a['kv_blocks_used']:g}, adapters pinned {a['adapters_pinned']:g}, "
        f"queue {a['queue_depth']:g}, running {a['running']:g} (idle after {a['settle_s']} s)",
        f"rss          start {_fmt(rss.get('start'))} MiB, "
        f"after warm-up {_fmt(rss.get('after_warmup'))} MiB, "
        f"end {_fmt(rss.get('end'))} MiB, peak {_fmt(rss.get('peak'))} MiB; "
        f"growth {_fmt(report['rss_growth_pct'])}%",
        "checks       " + ", ".join(f"{k} {'ok' if ok else 'FAILED'}" for k, ok in report["checks"].items()),
        "PASSED" if report["passed"] else "FAILED",
    ]
    if report.get("server_log_tail"):
        lines[-1:-1] = ["server log (last lines):", report["server_log_tail"]]
    print("\n".join(lines), file=out, flush=True)


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
    return Options(
        clients=ns.clients, duration_s=ns.duration, warmup_s=ns.warmup, disconnect_p=ns.disconnect,
        lora_p=ns.lora, adapters=ns.adapters, model=ns.model, url=ns.url, account=ns.account, token=ns.token,
        server_pid=ns.pid, max_batch=ns.max_batch, max_queue=ns.max_queue, max_tokens=max_tokens,
        backoff_s=ns.backoff, settle_s=ns.settle, seed=ns.seed, as_json=ns.json, server_log=ns.server_log,
    )


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

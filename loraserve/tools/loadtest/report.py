"""The report of `loraserve loadtest`: the checks, the figures, and their text form."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraserve.tools.loadtest.clients import Tally
from loraserve.tools.loadtest.server import HealthProber, ServerState

if TYPE_CHECKING:
    from loraserve.tools.loadtest.run import Options

HEALTH_LIMIT_S = 0.5
# 3040 must come at once, not after queueing. Judged by the server's own clock where it reports one: the
# clients' figures also hold this generator's event-loop delays, seconds on a 2-core machine it shares.
REFUSAL_LIMIT_S = 0.25
RSS_GROWTH_LIMIT = 0.10
# Under overload the server must keep this share of what it generates at the same batch without it.
LOADED_THROUGHPUT_SHARE = 0.8


@dataclass(frozen=True)
class Measured:
    """What a run saw beside the clients' tally: the server before and after, and the machine."""

    before: ServerState | None
    after: ServerState
    settle_s: float
    rss: dict[str, int | None]
    elapsed_s: float
    server: dict[str, Any]
    mean_running: float | None  # the server's running batch during the load
    cpu: dict[str, Any]
    unloaded: dict[str, Any] | None  # unloaded.unloaded_throughput at that batch


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize(opts: Options, tally: Tally, prober: HealthProber, m: Measured) -> dict[str, Any]:
    t, before, after, rss, elapsed_s = tally, m.before, m.after, m.rss, m.elapsed_s
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
    server_p99 = after.refusal_quantile(before, 0.99)
    refusal_p99 = server_p99 if after.refusal_buckets else percentile(t.refusal_s, 99)
    checks = {
        "health_max_under_500ms": (health_max is not None and health_max < HEALTH_LIMIT_S
                                   and not prober.failures),
        "no_5xx": fivexx == 0 and not after.new_5xx(before),
        "no_stream_errors": not t.stream_errors and not t.truncated and after.engine_errors == (
            before.engine_errors if before else 0),
        "no_hangs": t.hangs == 0 and not t.transport_errors,
        "only_200_or_3040": not unexpected,
        "refusals_quick": (refusal_p99 or 0.0) <= REFUSAL_LIMIT_S,
        "no_kv_leak": after.kv_blocks_used == 0,
        "no_pin_leak": after.adapters_pinned == 0,
        "queue_drained": after.queue_depth == 0 and after.running == 0,
        "rss_growth_under_10pct": growth is None or growth < RSS_GROWTH_LIMIT,
    }
    server_per_s = None if server_tokens is None else round(server_tokens / elapsed_s, 1)
    share = per_core_share = None
    if m.unloaded is not None and server_per_s is not None and m.unloaded["server_per_s"] > 0:
        share = round(server_per_s / m.unloaded["server_per_s"], 3)
        checks["throughput_80pct_of_unloaded"] = share >= LOADED_THROUGHPUT_SHARE
        # Per core the server had: on a machine shared with this generator, which takes more of it
        # under overload than beside the calm run, the share above also counts the generator's cost.
        loaded_cores, calm_cores = m.cpu.get("server_cores"), m.unloaded["cpu"].get("server_cores")
        if loaded_cores and calm_cores:
            per_core_share = round(share * calm_cores / loaded_cores, 3)
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "config": {"clients": opts.clients, "duration_s": opts.duration_s, "warmup_s": opts.warmup,
                   "disconnect_p": opts.disconnect_p, "lora_p": opts.lora_p, "model": opts.model,
                   "max_tokens": list(opts.max_tokens), "max_batch": opts.max_batch,
                   "max_queue": opts.max_queue, "engine_process": opts.engine_process,
                   "serve_args": list(opts.serve_args), **m.server},
        "requests": {"started": t.started, "completed": t.completed, "disconnected": t.disconnected,
                     "cut_at_end": t.cut_at_end, "refused_3040": refused_3040, "hangs": t.hangs,
                     "truncated": t.truncated},
        "responses": dict(sorted(t.responses.items())),
        "stream_errors": dict(t.stream_errors),
        "server_5xx": after.new_5xx(before),
        "transport_errors": dict(t.transport_errors),
        "tokens": {"received": t.tokens, "received_per_s": round(t.tokens / elapsed_s, 1),
                   "server_generated": server_tokens,
                   "server_per_s": server_per_s, "mean_running": None if m.mean_running is None
                   else round(m.mean_running, 1), "unloaded": m.unloaded, "share_of_unloaded": share,
                   "share_of_unloaded_per_server_core": per_core_share},
        "cpu": m.cpu,
        "ttft_ms": {"p50": _ms(percentile(t.ttft_s, 50)), "p99": _ms(percentile(t.ttft_s, 99)),
                    "max": _ms(max(t.ttft_s, default=None))},
        "refusal_ms": {"p50": _ms(percentile(t.refusal_s, 50)), "p99": _ms(percentile(t.refusal_s, 99)),
                       "max": _ms(max(t.refusal_s, default=None)),
                       # the server's own clock, as histogram bucket bounds: the client's figures above
                       # include its own event loop's delays on a machine it shares with the server
                       "server_p50_at_most": _ms(after.refusal_quantile(before, 0.5)),
                       "server_p99_at_most": _ms(server_p99)},
        "health_ms": {"probes": len(prober.latencies), "failures": dict(prober.failures),
                      "p50": _ms(percentile(prober.latencies, 50)),
                      "p99": _ms(percentile(prober.latencies, 99)), "max": _ms(health_max)},
        "after": {"settle_s": round(m.settle_s, 2), "kv_blocks_used": after.kv_blocks_used,
                  "adapters_pinned": after.adapters_pinned, "queue_depth": after.queue_depth,
                  "running": after.running},
        "rss_mib": {k: None if v is None else round(v / 1024, 1) for k, v in rss.items()},
        "rss_growth_pct": None if growth is None else round(growth * 100, 2),
        "elapsed_s": round(elapsed_s, 1),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def print_report(report: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    r, t, h, a = report["requests"], report["ttft_ms"], report["health_ms"], report["after"]
    tok, rss, ref, cpu = report["tokens"], report["rss_mib"], report["refusal_ms"], report["cpu"]
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
        f"p99 {_fmt(ref['p99'])} ms as the clients saw them; by the server's clock p50 <= "
        f"{_fmt(ref['server_p50_at_most'])} ms, p99 <= {_fmt(ref['server_p99_at_most'])} ms",
        f"tokens       {tok['received']} received ({tok['received_per_s']}/s); server generated "
        f"{_fmt(tok['server_generated'])} ({_fmt(tok['server_per_s'])}/s) at a mean running batch of "
        f"{_fmt(tok['mean_running'])}",
        _unloaded_line(tok),
        f"cpu          load generator {_fmt(cpu.get('loadtest_cores'))} cores "
        f"(nice {cpu.get('loadtest_nice')}), server with its engine {_fmt(cpu.get('server_cores'))} "
        f"cores, of {cpu.get('machine_cores')}"
        + (f"; engine threads {_fmt(cpu['engine_threads'])} on average" if cpu.get("engine_threads") else ""),
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




def _unloaded_line(tok: dict[str, Any]) -> str:
    u = tok["unloaded"]
    if u is None:
        return "unloaded     not measured"
    return (f"unloaded     {u['server_per_s']}/s with {u['clients']} clients and nothing else for "
            f"{u['seconds']} s (mean running batch {_fmt(u['mean_running'])}); "
            f"under load {_fmt(tok['share_of_unloaded'])} of it; per core the server got "
            f"({_fmt(u['cpu'].get('server_cores'))} then), {_fmt(tok['share_of_unloaded_per_server_core'])}"
            + (f"; engine threads {_fmt(u['cpu']['engine_threads'])}" if u["cpu"].get("engine_threads")
               else ""))

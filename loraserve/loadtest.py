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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loraserve import catalog
from loraserve.client import APIError, Client

ACCOUNT = "loadtest"
PROMPTS = (
    "tell me a story",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish, French and German.",
    "Summarise the plot of Hamlet for a ten year old, in a friendly tone, and end with a question.",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "hi",
)
MAX_TOKENS = (8, 16, 32, 64, 128)
CUT_EVENTS = 24  # a hang-up comes after 0..CUT_EVENTS events (0: before the first one, still queued)
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


@dataclass
class Tally:
    started: int = 0
    completed: int = 0  # read to [DONE]
    disconnected: int = 0  # hung up on purpose: after some events, or while queued
    cut_at_end: int = 0  # still running when the time was up
    responses: Counter[str] = field(default_factory=Counter)  # "200", "429 3040", ...
    stream_errors: Counter[str] = field(default_factory=Counter)  # error events inside a 200, by code
    transport_errors: Counter[str] = field(default_factory=Counter)  # by exception type
    truncated: int = 0  # a 200 stream that ended without [DONE] or an error event
    hangs: int = 0  # nothing read for read_timeout_s
    tokens: int = 0  # completion tokens received
    ttft_s: list[float] = field(default_factory=list)
    refusal_s: list[float] = field(default_factory=list)  # time to a 429


# -- the server --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SetupError(Exception):
    pass


class ServerProcess:
    """`loraserve serve` in a subprocess, with its log in the data dir."""

    def __init__(self, opts: Options, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "serve.log"
        args = [sys.executable, "-m", "loraserve", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
                "--model", opts.model, "--rate-limit", "0", "--log-level", "warning"]
        if opts.max_batch is not None:
            args += ["--max-batch", str(opts.max_batch)]
        if opts.max_queue is not None:
            args += ["--max-queue", str(opts.max_queue)]
        self.args = args
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SetupError(f"the server did not answer /healthz within {timeout_s:.0f} s:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def rss_kib(pid: int | None) -> int | None:
    """Resident memory of a process (VmRSS), None when it cannot be read."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_id(opts: Options) -> str:
    return opts.model.partition("=")[0].strip()


def model_source(opts: Options) -> str | None:
    try:
        return catalog.parse_model_arg(opts.model).source
    except ValueError:
        return None


def write_adapters(opts: Options, root: Path) -> list[Path]:
    """Valid random PEFT adapters for the model's shapes (q_proj and v_proj, ranks 4, 8, 16, ...)."""
    from loraserve.registry.synth import adapter_config, encode_safetensors, llama_model_info, lora_tensors

    shape = catalog.known_shape(model_source(opts) or "")
    if shape is None or opts.adapters == 0:
        return []
    info = llama_model_info(num_layers=shape["num_layers"], hidden=shape["hidden_size"],
                            intermediate=shape["intermediate_size"], heads=shape["num_heads"],
                            kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"])
    folders = []
    for i in range(opts.adapters):
        rank = (4, 8, 16)[i % 3]
        folder = root / f"adapter-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_bytes(adapter_config(rank, 2 * rank))
        tensors = lora_tensors(info, rank, seed=opts.seed + i)
        (folder / "adapter_model.safetensors").write_bytes(encode_safetensors(tensors))
        folders.append(folder)
    return folders


def register_adapters(opts: Options, url: str, token: str, folders: list[Path]) -> list[str]:
    names = []
    with Client(opts.account, token, url) as client:
        for i, folder in enumerate(folders):
            name = f"loadtest-{os.getpid()}-{i}"
            try:
                finetune = client.new_finetune(model_id(opts), name, "loadtest adapter")
                for file_name in ("adapter_config.json", "adapter_model.safetensors"):
                    client.upload_asset(finetune["id"], folder / file_name)
            except APIError as exc:
                raise SetupError(f"cannot register finetune {name}: {exc}") from None
            names.append(name)
    return names


# -- /metrics ----------------------------------------------------------------------------------------

def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


@dataclass(frozen=True)
class ServerState:
    kv_blocks_used: float
    adapters_pinned: float
    queue_depth: float
    running: float
    generation_tokens: float
    engine_errors: float  # generations that ended in an error
    http_5xx: dict[str, float]  # "route status" -> responses

    def new_5xx(self, before: ServerState | None) -> dict[str, float]:
        old = before.http_5xx if before is not None else {}
        return {k: v - old.get(k, 0) for k, v in self.http_5xx.items() if v > old.get(k, 0)}

    @property
    def idle(self) -> bool:
        return not (self.kv_blocks_used or self.adapters_pinned or self.queue_depth or self.running)


def read_state(http: httpx.Client, url: str) -> ServerState:
    response = http.get(f"{url}/metrics")
    response.raise_for_status()
    s = parse_metrics(response.text)
    return ServerState(
        kv_blocks_used=metric_sum(s, "loraserve_kv_blocks_used"),
        adapters_pinned=metric_sum(s, "loraserve_adapters_resident", tier="pinned"),
        queue_depth=metric_sum(s, "loraserve_queue_depth"),
        running=metric_sum(s, "loraserve_running_requests"),
        generation_tokens=metric_sum(s, "loraserve_generation_tokens_total"),
        engine_errors=metric_sum(s, "loraserve_generations_total", finish_reason="error"),
        http_5xx={f"{lab.get('route')} {lab.get('status')}": v for n, lab, v in s
                  if n == "loraserve_http_requests_total" and lab.get("status", "").startswith("5")},
    )


def settled_state(url: str, settle_s: float) -> tuple[ServerState, float]:
    """The server's state once it is idle (or when settle_s ran out), and how long that took."""
    started = time.monotonic()
    with httpx.Client(timeout=10.0) as http:
        while True:
            state = read_state(http, url)
            waited = time.monotonic() - started
            if state.idle or waited >= settle_s:
                return state, waited
            time.sleep(0.2)


# -- the prober --------------------------------------------------------------------------------------


class HealthProber(threading.Thread):
    """GET /healthz every `interval` on a fresh connection (as a load balancer does); also samples RSS."""

    def __init__(self, url: str, interval: float, pid: int | None) -> None:
        super().__init__(name="health-prober", daemon=True)
        self.url, self.interval, self.pid = url, interval, pid
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()
        self.rss_peak_kib: int | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=10.0, limits=limits) as http:
            next_at = time.monotonic()
            while not self._halt.is_set():
                started = time.perf_counter()
                try:
                    status = http.get(f"{self.url}/healthz").status_code
                    if status != 200:
                        self.failures[f"status {status}"] += 1
                except httpx.HTTPError as exc:
                    self.failures[type(exc).__name__] += 1
                self.latencies.append(time.perf_counter() - started)
                rss = rss_kib(self.pid)
                if rss is not None:
                    self.rss_peak_kib = max(rss, self.rss_peak_kib or 0)
                next_at += self.interval
                self._halt.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- the clients -------------------------------------------------------------------------------------


def _error_code(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        return str(data["errors"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "?"


class LoadClients:
    def __init__(self, opts: Options, url: str, token: str, finetunes: list[str]) -> None:
        self.opts = opts
        self.run_url = f"{url}/client/v4/accounts/{opts.account}/ai/run/{model_id(opts)}"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.finetunes = finetunes
        self.tally = Tally()

    def body(self, rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": rng.choice(PROMPTS),
            "max_tokens": rng.choice(self.opts.max_tokens),
            "temperature": round(rng.uniform(0.0, 1.0), 2),
            "seed": rng.randrange(1 << 30),
            "stream": True,
        }
        if self.finetunes and rng.random() < self.opts.lora_p:
            body["lora"] = rng.choice(self.finetunes)
        return body

    async def run(self, duration_s: float) -> None:
        opts = self.opts
        limits = httpx.Limits(max_connections=opts.clients + 8, max_keepalive_connections=opts.clients + 8)
        timeout = httpx.Timeout(30.0, read=opts.read_timeout_s)
        async with httpx.AsyncClient(headers=self.headers, limits=limits, timeout=timeout) as http:
            tasks = [asyncio.create_task(self._client(http, random.Random(opts.seed * 100_003 + i)))
                     for i in range(opts.clients)]
            await asyncio.sleep(duration_s)
            for task in tasks:  # time is up: whatever is in flight is cut, as a mass disconnect
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, 1.0))  # do not all connect in the same millisecond
        while True:
            await self._request(http, rng)

    async def _request(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        t, loop = self.tally, asyncio.get_running_loop()
        body = self.body(rng)
        cut = rng.randint(0, CUT_EVENTS) if rng.random() < self.opts.disconnect_p else None
        patience = rng.uniform(0.05, 2.0) if cut == 0 else None  # hang up while (probably) still queued
        started = loop.time()
        t.started += 1
        state = "in flight"
        try:
            async with asyncio.timeout(patience):
                state = await self._stream(http, body, cut, started)
        except TimeoutError:  # asyncio.timeout's, i.e. our own patience ran out
            t.disconnected += 1
            return
        except httpx.ReadTimeout:
            t.hangs += 1
        except httpx.HTTPError as exc:
            t.transport_errors[type(exc).__name__] += 1
            await asyncio.sleep(self.opts.backoff_s)
        except asyncio.CancelledError:  # the time is up
            t.cut_at_end += 1
            raise
        if state in ("refused", "error"):  # back off, as a client should (and never spin on errors)
            await asyncio.sleep(self.opts.backoff_s * rng.uniform(0.5, 1.5))

    async def _stream(self, http: httpx.AsyncClient, body: dict[str, Any], cut: int | None, started: float) -> str:
        t, loop = self.tally, asyncio.get_running_loop()
        async with http.stream("POST", self.run_url, json=body) as response:
            if response.status_code != 200:
                code = _error_code(await response.aread())
                t.responses[f"{response.status_code} {code}"] += 1
                if response.status_code == 429:
                    t.refusal_s.append(loop.time() - started)
                    return "refused"
                return "error"
            t.responses["200"] += 1
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    t.completed += 1
                    return "done"
                event = json.loads(data)
                if "errors" in event:
                    t.stream_errors[_error_code(data.encode())] += 1
                    return "error"
                if events == 0:
                    t.ttft_s.append(loop.time() - started)
                events += 1
                if "usage" in event:
                    t.tokens += int(event["usage"].get("completion_tokens", 0))
                elif cut is not None and events >= cut:
                    t.tokens += events
                    t.disconnected += 1
                    return "disconnected"  # leaving the block closes the connection mid-stream
            t.truncated += 1
            return "truncated"


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
    unexpected = {k: n for k, n in t.responses.items() if k not in ("200", "429 3040") and not k.startswith("5")}
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
                   "max_tokens": list(opts.max_tokens), "max_batch": opts.max_batch, "max_queue": opts.max_queue,
                   **server},
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
                      "p50": _ms(percentile(prober.latencies, 50)), "p99": _ms(percentile(prober.latencies, 99)),
                      "max": _ms(health_max)},
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
            proc = ServerProcess(opts, data_dir)
            if opts.server_log is not None:  # copied once the server has stopped (callbacks run last first)
                stack.callback(shutil.copyfile, proc.log_path, opts.server_log)
            stack.callback(proc.stop)
            proc.wait_ready(opts.startup_timeout_s)
            url, pid = proc.url, proc.pid
        else:
            if opts.token is None:
                raise SetupError("--url needs --token (and --account)")
            url, pid, token = opts.url.rstrip("/"), opts.server_pid, opts.token
        finetunes = register_adapters(opts, url, token, write_adapters(opts, data_dir / "adapters"))
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
        f"loadtest: {report['config']['clients']} clients, {report['elapsed_s']} s, model {report['config']['model']}",
        f"requests     started {r['started']}, completed {r['completed']}, disconnected {r['disconnected']}, "
        f"cut at end {r['cut_at_end']}, hangs {r['hangs']}, truncated {r['truncated']}",
        "responses    " + ", ".join(f"{k}: {n}" for k, n in report["responses"].items())
        + (f"; stream errors {report['stream_errors']}" if report["stream_errors"] else "")
        + (f"; transport errors {report['transport_errors']}" if report["transport_errors"] else "")
        + (f"; server-side 5xx {report['server_5xx']}" if report["server_5xx"] else ""),
        f"refusals     3040 x{r['refused_3040']}, answered in p50 {_fmt(ref['p50'])} ms, p99 {_fmt(ref['p99'])} ms",
        f"tokens       {tok['received']} received ({tok['received_per_s']}/s); server generated "
        f"{_fmt(tok['server_generated'])} ({_fmt(tok['server_per_s'])}/s)",
        f"ttft         p50 {_fmt(t['p50'])} ms, p99 {_fmt(t['p99'])} ms, max {_fmt(t['max'])} ms",
        f"health       {h['probes']} probes, p50 {_fmt(h['p50'])} ms, p99 {_fmt(h['p99'])} ms, max {_fmt(h['max'])} ms"
        + (f", failures {h['failures']}" if h["failures"] else ""),
        f"after        kv blocks used {a['kv_blocks_used']:g}, adapters pinned {a['adapters_pinned']:g}, "
        f"queue {a['queue_depth']:g}, running {a['running']:g} (idle after {a['settle_s']} s)",
        f"rss          start {_fmt(rss.get('start'))} MiB, after warm-up {_fmt(rss.get('after_warmup'))} MiB, "
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
                   help="ID=SOURCE as for `loraserve serve` (default: the embedded SmolLM2); with --url, the id "
                        "to run (and SOURCE, if known, for the finetunes' shapes)")
    p.add_argument("--max-tokens", default=",".join(map(str, d.max_tokens)),
                   help="comma-separated max_tokens values to pick from")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="serve --max-batch (started server only)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="serve --max-queue (started server only); below clients - batch, so that surplus exists")
    p.add_argument("--backoff", type=float, default=d.backoff_s, help="mean seconds a refused client waits")
    p.add_argument("--settle", type=float, default=d.settle_s, help="seconds to wait for the server to go idle")
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
        raise SystemExit("--clients >= 1, --duration > 0, 0 <= --disconnect <= 1 and --max-tokens are required")
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

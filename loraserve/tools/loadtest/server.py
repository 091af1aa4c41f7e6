"""The server side of `loraserve loadtest`: `loraserve serve` in a subprocess, synthetic finetunes,
and the server's state as /metrics, /healthz and /proc/PID/status tell it. No torch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loraserve import catalog
from loraserve.client import APIError, Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SetupError(Exception):
    pass


class ServerProcess:
    """`loraserve serve` in a subprocess, with its log in the data dir."""

    def __init__(self, model: str, max_batch: int | None, max_queue: int | None, data_dir: Path,
                 extra_args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "serve.log"
        args = [sys.executable, "-m", "loraserve", "serve", "--port", str(self.port),
                "--data-dir", str(data_dir), "--model", model, "--rate-limit", "0", "--log-level", "warning"]
        if max_batch is not None:
            args += ["--max-batch", str(max_batch)]
        if max_queue is not None:
            args += ["--max-queue", str(max_queue)]
        args += extra_args
        self.args = args
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SetupError(
                    f"the server did not answer /healthz within {timeout_s:.0f} s:\n{self.log_tail()}"
                )
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


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (the engine process of `serve --engine-process` is a child)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])  # comm may hold spaces
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        frontier += children
    return tree


def _vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int | None) -> int | None:
    """Resident memory of a server (VmRSS), its engine process included; None when it cannot be read."""
    if pid is None or (own := _vm_rss_kib(pid)) is None:
        return None
    return own + sum(_vm_rss_kib(child) or 0 for child in process_tree(pid)[1:])


def model_id(model: str) -> str:
    """The served id of a `--model` argument (ID=SOURCE, or a catalog id alone)."""
    return model.partition("=")[0].strip()


def model_source(model: str) -> str | None:
    try:
        return catalog.parse_model_arg(model).source
    except ValueError:
        return None


def write_adapters(model: str, count: int, seed: int, root: Path) -> list[Path]:
    """Valid random PEFT adapters for the model's shapes (q_proj and v_proj, ranks 4, 8, 16, ...)."""
    from loraserve.registry.synth import adapter_config, encode_safetensors, llama_model_info, lora_tensors

    shape = catalog.known_shape(model_source(model) or "")
    if shape is None or count == 0:
        return []
    info = llama_model_info(num_layers=shape["num_layers"], hidden=shape["hidden_size"],
                            intermediate=shape["intermediate_size"], heads=shape["num_heads"],
                            kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
                            architecture=shape.get("architecture", "llama"))
    folders = []
    for i in range(count):
        rank = (4, 8, 16)[i % 3]
        folder = root / f"adapter-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_bytes(adapter_config(rank, 2 * rank))
        tensors = lora_tensors(info, rank, seed=seed + i)
        (folder / "adapter_model.safetensors").write_bytes(encode_safetensors(tensors))
        folders.append(folder)
    return folders


def register_adapters(account: str, model: str, url: str, token: str, folders: list[Path]) -> list[str]:
    names = []
    with Client(account, token, url) as client:
        for i, folder in enumerate(folders):
            name = f"loadtest-{os.getpid()}-{i}"
            try:
                finetune = client.new_finetune(model_id(model), name, "loadtest adapter")
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
    # The server's own timing of its 429s: bucket upper bound (s) -> refusals that took at most that.
    refusal_buckets: dict[float, float] = field(default_factory=dict)

    def new_5xx(self, before: ServerState | None) -> dict[str, float]:
        old = before.http_5xx if before is not None else {}
        return {k: v - old.get(k, 0) for k, v in self.http_5xx.items() if v > old.get(k, 0)}

    def refusal_quantile(self, before: ServerState | None, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile of the refusals since `before`."""
        old = before.refusal_buckets if before is not None else {}
        counts = sorted((le, n - old.get(le, 0.0)) for le, n in self.refusal_buckets.items())
        total = counts[-1][1] if counts else 0.0
        if total <= 0:
            return None
        return next(le for le, n in counts if n >= q * total)

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
        refusal_buckets={float(lab["le"]): v for n, lab, v in s
                         if n == "loraserve_http_refusal_duration_seconds_bucket"},
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

"""What the overload is compared with, and who used the cores meanwhile.

- `BatchSampler` reads the server's running batch from /metrics while the load runs, so the report can
  say at which batch the loaded throughput was reached.
- `unloaded_throughput` then drives the same server with exactly that many closed-loop clients (same
  prompts, lengths and finetunes; no surplus, no hang-ups): the server's throughput at the same batch
  without the overload's HTTP work. The ratio of the two is what the overload costs.
- `CpuMeter` counts the CPU seconds of the load generator and of the server's whole process tree (the
  engine process included): on a small machine a load generator that takes a core unnoticed makes any
  server look slow.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from loraserve.tools.loadtest.clients import LoadClients
from loraserve.tools.loadtest.server import metric_sum, parse_metrics, process_tree, read_state

if TYPE_CHECKING:
    from loraserve.tools.loadtest.run import Options

_TICKS = os.sysconf("SC_CLK_TCK")


class BatchSampler(threading.Thread):
    """The server's running batch, read from /metrics every `interval` seconds, and the threads its engine
    steps with where it adapts them (`loraserve_compute_threads`)."""

    def __init__(self, url: str, interval: float = 0.5) -> None:
        super().__init__(name="batch-sampler", daemon=True)
        self.url, self.interval = url, interval
        self.samples: list[float] = []
        self.threads: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10.0) as http:
            while not self._halt.wait(self.interval):
                try:
                    text = http.get(f"{self.url}/metrics").text
                except httpx.HTTPError:
                    continue
                metrics = parse_metrics(text)
                self.samples.append(metric_sum(metrics, "loraserve_running_requests"))
                if any(name == "loraserve_compute_threads" for name, _, _ in metrics):
                    self.threads.append(metric_sum(metrics, "loraserve_compute_threads"))

    def stop(self) -> float | None:
        """Stops sampling; the mean running batch, None when nothing was read."""
        self._halt.set()
        self.join()
        return sum(self.samples) / len(self.samples) if self.samples else None

    def mean_threads(self) -> float | None:
        """The engine's mean compute threads over the samples (after `stop`); None where not reported."""
        return round(sum(self.threads) / len(self.threads), 2) if self.threads else None


def _cpu_s(pid: int) -> float:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:  # it exited meanwhile
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _tree_cpu_s(root: int) -> float | None:
    """User + system CPU seconds of `root` and its live descendants (the engine process of
    `serve --engine-process` is a child the server does not reap while it runs, so /proc's cutime
    would miss it)."""
    if not (Path("/proc") / str(root)).exists():
        return None
    return sum(_cpu_s(pid) for pid in process_tree(root))


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU used by this process and by the server's tree between `start` and `stop`, in cores."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self._started = (time.monotonic(), _own_cpu_s(), self._server())

    def _server(self) -> float | None:
        return None if self.server_pid is None else _tree_cpu_s(self.server_pid)

    def stop(self) -> dict[str, Any]:
        wall0, own0, server0 = self._started
        wall = max(time.monotonic() - wall0, 1e-9)
        server1 = self._server()
        server = None if server0 is None or server1 is None else round((server1 - server0) / wall, 2)
        return {"machine_cores": os.cpu_count(), "loadtest_cores": round((_own_cpu_s() - own0) / wall, 2),
                "server_cores": server, "loadtest_nice": os.getpriority(os.PRIO_PROCESS, 0)}


def unloaded_throughput(opts: Options, url: str, server_pid: int | None, token: str, finetunes: list[str],
                        batch: int) -> dict[str, Any]:
    """Tokens per second the server generates for `batch` closed-loop clients and nothing else."""
    calm = replace(opts, clients=batch, disconnect_p=0.0, seed=opts.seed + 1)
    clients = LoadClients(calm, url, token, finetunes)
    sampler = BatchSampler(url)
    meter: list[CpuMeter] = []
    with httpx.Client(timeout=10.0) as http:
        # The clients' first requests are spread over their first second: start counting after it.
        before_at = [0.0, 0.0]

        async def drive() -> None:
            task = asyncio.create_task(clients.run(opts.unloaded_s + 1.0))
            await asyncio.sleep(1.0)
            before_at[:] = [read_state(http, url).generation_tokens, time.monotonic()]
            sampler.start()
            meter.append(CpuMeter(server_pid))
            await task

        asyncio.run(drive())
        tokens = read_state(http, url).generation_tokens - before_at[0]
        elapsed = time.monotonic() - before_at[1]
    cpu = meter[0].stop()
    mean_batch = sampler.stop()
    cpu["engine_threads"] = sampler.mean_threads()
    refused = sum(n for key, n in clients.tally.responses.items() if key != "200")
    return {"clients": batch, "seconds": round(elapsed, 1),
            "mean_running": None if mean_batch is None else round(mean_batch, 1),
            "server_per_s": round(tokens / elapsed, 1), "refused": refused, "cpu": cpu}

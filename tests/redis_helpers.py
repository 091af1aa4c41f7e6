"""A throwaway `redis-server` on loopback (Debian's, from scripts/install), and gateways that count their rate
limit in it: for the tests of state that several gateway processes share.

`redis_server` is one server for the session (give each test its own keys or accounts); a test that kills
and restarts Redis starts a `RedisServer` of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.registry import Registry
from loraserve.tools.loadtest.server import free_port

CLOSE_PATH = "/test-only/close-rate-limiter"


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (scripts/install installs Debian's as root)")


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`, nothing persisted; `kill()` is kill -9, `start()` again comes
    back on the same port (what a client sees of a Redis that crashed and was restarted)."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = work_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.work_dir), "--loglevel", "warning"]
        with open(self.work_dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server did not come up on port {self.port}:\n{self.log()}")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def log(self) -> str:
        path = self.work_dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    require_redis_server()
    work_dir = Path(tempfile.mkdtemp(prefix="loraserve-redis-"))
    try:
        with RedisServer(work_dir) as server:
            yield server
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@contextmanager
def gateway(registry: Registry, backends: Mapping[str, Any], settings: ServerSettings) -> Iterator[str]:
    """One more API server (a gateway) on its own socket; yields its base URL.

    Its Redis connections live on the server's event loop and must be closed there before the loop ends
    (else asyncio warns of unclosed transports), and `serve` runs no lifespan: a test-only route does it.
    """
    app = create_app(registry, backends, settings)
    limiter = app.state.loraserve.rate_limiter

    async def close_limiter() -> None:
        await limiter.aclose()

    app.add_api_route(CLOSE_PATH, close_limiter, methods=["POST"])
    with BackgroundServer(app) as live:
        try:
            yield live.base_url
        finally:
            httpx.post(live.base_url + CLOSE_PATH, timeout=10).raise_for_status()

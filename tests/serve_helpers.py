"""`loraserve serve` and `loraserve token create` as real subprocesses, for the tests that must start,
interrupt or kill -9 a whole server (test_cli.py, test_crash.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from loraserve.tools.loadtest.server import free_port


def create_token(data_dir: Path, account: str, timeout: float = 60) -> str:
    """`loraserve token create`: the token is alone on the last line of stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "loraserve", "token", "create", "--account", account,
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


class ServeProcess:
    """One `loraserve serve` in its own process group, its output in `log_path` (no pipes to drain).

    `start()` waits for /healthz; `kill()` is kill -9 of the whole group; `stop()` is Ctrl-C.
    Use it as a context manager: whatever happens, the process is gone (and reaped) afterwards.
    """

    def __init__(self, data_dir: Path, log_path: Path, models: list[str], port: int | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.args = [sys.executable, "-m", "loraserve", "serve", "--port", str(self.port),
                     "--data-dir", str(data_dir), "--log-level", "warning"]
        for model in models:
            self.args += ["--model", model]
        self.args += list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> float:
        """Starts the server and returns the seconds until /healthz answered."""
        assert self.proc is None
        began = time.monotonic()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=self.env, start_new_session=True)
        with httpx.Client(timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() - began > timeout:
                    raise AssertionError(f"serve did not come up in {timeout} s:\n{self.log()}")
                try:
                    if client.get(f"{self.base_url}/healthz").status_code == 200:
                        return time.monotonic() - began
                except httpx.TransportError:
                    pass
                time.sleep(0.05)

    def kill(self) -> float:
        """kill -9 the process group; returns the monotonic time the signal was sent."""
        assert self.proc is not None
        sent = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        return sent

    def stop(self, timeout: float = 30) -> int:
        """Ctrl-C, as an operator would; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

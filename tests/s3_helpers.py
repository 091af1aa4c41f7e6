"""A real S3 for the adapter store tests: moto's server (`python -m moto.server`) on a loopback port, a
bucket in it, and the AWS_* environment that points botocore (under s3fs) at it, in this process and in
any `loraserve serve` started with `S3Server.env()`. Skips where moto or s3fs is not installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraserve.tools.loadtest.server import free_port

BUCKET = "loraserve-test"


class S3Server:
    """One moto server; `stop()` and `start()` again on the same port, as an outage and its end (moto
    keeps its objects in memory: a restarted server is empty, `create_bucket` again)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Nothing from the machine's own AWS setup.
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            # One attempt: a stopped server fails a request at once instead of after botocore's retries.
            "AWS_MAX_ATTEMPTS": "1",
        }

    def start(self, timeout: float = 30) -> None:
        assert self.proc is None
        with open(self.root / "moto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"moto exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.endpoint}/moto-api/", timeout=1).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"moto did not come up in {timeout} s: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def log(self) -> str:
        path = self.root / "moto.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def fs(self) -> Any:
        """A client of its own, to look at (or tamper with) what the server holds."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key="testing", secret="testing", skip_instance_cache=True,
            use_listings_cache=False,
        )

    def create_bucket(self) -> None:
        self.fs().mkdir(BUCKET)


@contextmanager
def running_s3(root: Path) -> Iterator[S3Server]:
    """A started server with its bucket, and this process's environment pointing at it."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'loraserve[dev]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'loraserve[cluster]')")
    server = S3Server(root)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in server.env().items():
            mp.setenv(name, value)
        try:
            server.start()
            server.create_bucket()
            yield server
        finally:
            server.stop()

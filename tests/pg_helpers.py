"""A throwaway PostgreSQL server (initdb + pg_ctl, unix socket only, nothing durable) for the tests that run
the registry on PostgreSQL, and for those that take the database away under a running server and bring it
back (`stop()` is an immediate shutdown, `start()` brings the same cluster back on the same socket).

Skipped only where the machine has no PostgreSQL server binaries or no psycopg driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import pytest
from sqlalchemy import create_engine, text


def require_postgres() -> None:
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed")
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("no PostgreSQL server binaries on this machine")


def _server_command(args: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and the dev machines run tests as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *args]
    return args


class PostgresServer:
    """A fresh cluster in a temp directory whose socket is in that directory; use it as a context manager
    (started on entry, stopped and removed on exit)."""

    def __init__(self) -> None:
        require_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="lorapg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
        self.data = self.root / "data"

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://lora@/{database}?host={self.root}"

    def initdb(self) -> None:
        subprocess.run(
            _server_command(["initdb", "-D", str(self.data), "-A", "trust", "-U", "lora", "--no-sync"]),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off"
        subprocess.run(
            _server_command(
                ["pg_ctl", "-D", str(self.data), "-o", options, "-w", "-l", str(self.root / "log"), "start"]
            ),
            check=True,
            capture_output=True,
        )

    def running(self) -> bool:
        status = ["pg_ctl", "-D", str(self.data), "status"]
        return subprocess.run(_server_command(status), capture_output=True).returncode == 0

    def stop(self) -> None:
        """An immediate shutdown: every connection is cut, as when the database host goes away."""
        subprocess.run(
            _server_command(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
        )

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t_{uuid.uuid4().hex}"
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        try:
            self.initdb()
            self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

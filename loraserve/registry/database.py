"""Opening the registry database: engine settings per backend and self-applied Alembic migrations."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import CursorResult, Result, make_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Long enough to ride out another writer's fsync on a slow disk, short enough to fail a stuck request.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# libpq waits for a host that does not answer as long as TCP does (minutes), holding a worker thread per
# request; bounded, the request gets its 3040 (outage.py). libpq's minimum is 2 s. A URL's own wins.
PG_CONNECT_TIMEOUT_S = 5


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir.resolve() / 'registry.sqlite3'}"


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers never block the writer (the API serves reads while an upload commits).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # FULL: in WAL mode NORMAL survives a process crash (kill -9 loses no page cache) but may drop
        # the last commits on power loss, e.g. an upload already answered 200 or a token already
        # printed. The registry writes rarely; one more fsync per commit is cheap.
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    """An engine safe to share between threads; each thread checks out its own pooled connection."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
    # pre_ping: a server-side database may drop idle connections between requests, or restart.
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def alembic_config() -> Config:
    cfg = Config()
    # ConfigParser interpolates "%": a path containing one must be escaped.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


def migrate(engine: Engine, lock_path: Path) -> None:
    """`alembic upgrade head` on `engine`; the file lock keeps two processes on one host from racing."""
    cfg = alembic_config()
    with _file_lock(lock_path), engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def rows_matched(result: Result[Any]) -> int:
    """Rows an UPDATE/DELETE matched (executing one always yields a CursorResult)."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"expected the result of an UPDATE or DELETE, got {type(result).__name__}")
    return result.rowcount

"""The registry while its database is away: every call raises RegistryUnavailable (429 / 3040), the outage
is logged once each way with no password, calls are served again when the database is back without
reopening anything, and an upload the outage cuts leaves neither a record nor a file.

On a throwaway PostgreSQL (pg_helpers.py) that the tests stop (an immediate shutdown) and start again;
skipped only where PostgreSQL or psycopg is missing. The SQLite cases need neither.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import IntegrityError, ProgrammingError

from loraserve.errors import FinetuneNotFound, RegistryUnavailable
from loraserve.registry import AssetFile, Registry, RegistryLimits, synth
from loraserve.registry.database import PG_CONNECT_TIMEOUT_S, make_engine
from loraserve.registry.outage import OutageWatch
from loraserve.registry.schema import AssetRow

from pg_helpers import PostgresServer

BASE = synth.llama_model_info()
MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
CONFIG = synth.adapter_config(4, 8)
WEIGHTS = synth.encode_safetensors(synth.lora_tensors(BASE, 4))
PASSWORD = "hunter2-not-logged"  # trust authentication accepts any password: only its leaking is tested
OUTAGE_LOG = "loraserve.registry.outage"


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg(pg_server: PostgresServer) -> Iterator[PostgresServer]:
    """The module's server, running again after the test whatever the test did to it."""
    yield pg_server
    if not pg_server.running():
        pg_server.start()


@pytest.fixture
def db_url(pg: PostgresServer) -> str:
    return pg.new_database().replace("lora@", f"lora:{PASSWORD}@")


@pytest.fixture
def registry(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path, db_url, RegistryLimits(max_rank=8)) as reg:
        yield reg


def _registry_calls(reg: Registry, token: str, finetune_id: str) -> dict[str, Callable[[], object]]:
    """Every public registry call the API makes, each touching the database."""
    return {
        "account_exists": lambda: reg.account_exists("alice"),
        "authenticate": lambda: reg.authenticate("alice", token),
        "token": lambda: reg.token(token),
        "create_token": lambda: reg.create_token("bob"),
        "list_tokens": lambda: reg.list_tokens("alice"),
        "create_finetune": lambda: reg.create_finetune("alice", MODEL, f"n{time.monotonic_ns()}"),
        "get_finetune": lambda: reg.get_finetune("alice", finetune_id),
        "list_finetunes": lambda: reg.list_finetunes("alice"),
        "list_public": lambda: reg.list_public(),
        "adapter_for": lambda: reg.adapter_for("alice", MODEL, finetune_id),
        "add_asset": lambda: reg.add_asset("alice", finetune_id, AssetFile.CONFIG.value, io.BytesIO(CONFIG),
                                           BASE),
        "delete_finetune": lambda: reg.delete_finetune("alice", "not-there"),
    }


def test_every_call_is_3040_while_down_and_served_when_back(
    registry: Registry, pg: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = registry.create_token("alice")
    finetune = registry.create_finetune("alice", MODEL, "mine")
    for file, blob in ((AssetFile.CONFIG, CONFIG), (AssetFile.WEIGHTS, WEIGHTS)):
        registry.add_asset("alice", finetune.id, file.value, io.BytesIO(blob), BASE)
    calls = _registry_calls(registry, token, finetune.id)
    caplog.set_level(logging.WARNING, OUTAGE_LOG)

    pg.stop()
    for name, call in calls.items():
        with pytest.raises(RegistryUnavailable) as unavailable:
            call()
        error = unavailable.value
        assert (error.status, error.code) == (429, 3040), name
        assert "registry database is unavailable" in error.message and PASSWORD not in error.message
    down = [r.getMessage() for r in caplog.records if r.name == OUTAGE_LOG]
    assert len(down) == 1 and "is unavailable" in down[0], down  # once, not once per call
    assert "postgresql+psycopg://lora:***@/" in down[0] and PASSWORD not in caplog.text

    pg.start()  # the same Registry, never reopened
    for name, call in calls.items():
        if name == "delete_finetune":
            with pytest.raises(FinetuneNotFound):
                call()
        else:
            call()
    assert registry.adapter_for("alice", MODEL, "mine")[0].ready
    logged = [r.getMessage() for r in caplog.records if r.name == OUTAGE_LOG]
    assert len(logged) == 2 and logged[1].endswith("answers again"), logged


class _CutsTheDatabase(io.BytesIO):
    """An upload body whose last read stops the database: the outage begins mid-upload, after the
    registry resolved the finetune and before anything of the file was recorded."""

    def __init__(self, data: bytes, server: PostgresServer) -> None:
        super().__init__(data)
        self.server = server

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if not chunk:
            self.server.stop()
        return chunk


def _visible_files(reg: Registry, finetune_id: str) -> list[str]:
    directory = reg.storage.directory(finetune_id)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _asset_rows(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(select(AssetRow.file_name)))
    finally:
        engine.dispose()


def test_an_upload_cut_mid_body_leaves_nothing(registry: Registry, pg: PostgresServer) -> None:
    registry.create_token("alice")
    finetune = registry.create_finetune("alice", MODEL, "mine")
    with pytest.raises(RegistryUnavailable):
        registry.add_asset("alice", finetune.id, AssetFile.CONFIG.value, _CutsTheDatabase(CONFIG, pg), BASE)
    assert _visible_files(registry, finetune.id) == []  # the temp file is gone too
    pg.start()
    assert not registry.get_finetune("alice", finetune.id).has_config
    assert registry.recover().clean
    registry.add_asset("alice", finetune.id, AssetFile.CONFIG.value, io.BytesIO(CONFIG), BASE)
    assert registry.get_finetune("alice", finetune.id).has_config


def test_an_upload_cut_at_its_commit_takes_its_installed_file_back(
    registry: Registry, pg: PostgresServer, db_url: str
) -> None:
    """The worst moment: the file is renamed into place and the commit is under way. A deferred trigger
    holds the commit (pg_sleep) so that the database can be stopped exactly then."""
    registry.create_token("alice")
    finetune = registry.create_finetune("alice", MODEL, "mine")
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text("CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS "
                              "$$ BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$"))
            conn.execute(text("CREATE CONSTRAINT TRIGGER hold_commit AFTER UPDATE ON finetunes "
                              "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()"))
        outcome: list[BaseException | None] = []

        def upload() -> None:
            try:
                registry.add_asset("alice", finetune.id, AssetFile.CONFIG.value, io.BytesIO(CONFIG), BASE)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=upload)
        worker.start()
        deadline = time.monotonic() + 30
        with admin.connect() as conn:
            while not conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")):
                assert time.monotonic() < deadline and worker.is_alive(), outcome
                time.sleep(0.02)
        # The commit is held: the file is in place, announced by its intent marker, not yet vouched for.
        assert _visible_files(registry, finetune.id) == [".installing-adapter_config.json",
                                                          "adapter_config.json"]
        pg.stop()
        worker.join(timeout=30)
        assert len(outcome) == 1 and isinstance(outcome[0], RegistryUnavailable), outcome
        assert _visible_files(registry, finetune.id) == []
        pg.start()
        with admin.connect() as conn:
            conn.execute(text("DROP TRIGGER hold_commit ON finetunes"))
    finally:
        admin.dispose()
    assert _asset_rows(db_url) == [] and not registry.get_finetune("alice", finetune.id).has_config
    assert registry.recover().clean
    registry.add_asset("alice", finetune.id, AssetFile.CONFIG.value, io.BytesIO(CONFIG), BASE)
    assert _asset_rows(db_url) == [AssetFile.CONFIG.value]


# -- what counts as an outage ----------------------------------------------------------------------------


def test_refused_statements_are_not_outages(pg: PostgresServer) -> None:
    """A constraint or a bug is the caller's to handle (or a 500): it must not read as "try again"."""
    engine = make_engine(pg.new_database())
    watch = OutageWatch(engine)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id int PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(ProgrammingError), engine.begin() as conn:
            conn.execute(text("SELECT nothing FROM nowhere"))
        assert not watch.unavailable
    finally:
        engine.dispose()


def test_an_unopenable_sqlite_file_is_an_outage(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'registry.sqlite3'}")
    watch = OutageWatch(engine)
    try:
        with pytest.raises(RegistryUnavailable), engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert watch.unavailable
        (tmp_path / "missing-dir").mkdir()
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT 1")) == 1
        assert not watch.unavailable
    finally:
        engine.dispose()


def test_postgres_connections_have_a_connect_timeout(pg: PostgresServer) -> None:
    """libpq's default is to wait as long as TCP does for a host that does not answer."""

    def connect_timeout(url: str) -> Any:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return conn.connection.driver_connection.info.get_parameters().get("connect_timeout")
        finally:
            engine.dispose()

    url = pg.new_database()
    assert connect_timeout(url) == str(PG_CONNECT_TIMEOUT_S)
    assert connect_timeout(f"{url}&connect_timeout=3") == "3"  # the URL's own wins

"""Finetune records on a real SQLite registry: names, visibility between accounts, listing, persistence,
migrations, concurrency."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from loraserve.errors import (
    AccountLimitExceeded,
    AuthenticationError,
    BadInput,
    FinetuneConflict,
    FinetuneNotFound,
    WorkersAIError,
)
from loraserve.registry import Finetune, PublicOrder, Registry, RegistryLimits
from loraserve.registry.database import default_url, make_engine, migrate
from loraserve.registry.schema import Base

MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path / "data", limits=RegistryLimits(max_finetunes_per_account=5)) as r:
        for account in ("alice", "bob"):
            r.create_token(account)
        yield r


def test_create_returns_the_api_shape(reg: Registry) -> None:
    ft = reg.create_finetune("alice", MODEL, "my-lora", "about it")
    assert str(uuid.UUID(ft.id)) == ft.id and uuid.UUID(ft.id).version == 4
    assert ISO.fullmatch(ft.created_at) and ft.modified_at == ft.created_at
    assert (ft.has_config, ft.has_weights, ft.ready) == (False, False, False)
    assert ft.to_api() == {
        "id": ft.id,
        "name": "my-lora",
        "description": "about it",
        "model": MODEL,
        "public": False,
        "created_at": ft.created_at,
        "modified_at": ft.modified_at,
    }


def test_get_list_delete_by_id_and_by_name(reg: Registry) -> None:
    a = reg.create_finetune("alice", MODEL, "a")
    b = reg.create_finetune("alice", MODEL, "b.v2_x-y", public=True)
    assert reg.get_finetune("alice", a.id) == a == reg.get_finetune("alice", "a")
    assert reg.get_finetune("alice", a.id.upper()) == a  # any UUID spelling
    assert [f.name for f in reg.list_finetunes("alice")] == ["a", "b.v2_x-y"]
    assert reg.delete_finetune("alice", "a") == a
    assert reg.delete_finetune("alice", b.id) == b
    assert reg.list_finetunes("alice") == []
    for ref in (a.id, "a", b.id):
        with pytest.raises(FinetuneNotFound) as info:
            reg.get_finetune("alice", ref)
        assert (info.value.code, info.value.status) == (3037, 404)
        with pytest.raises(FinetuneNotFound):
            reg.delete_finetune("alice", ref)


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("", BadInput, "1 to 128"),
        ("x" * 129, BadInput, "1 to 128"),
        ("a/b", BadInput, "may only contain"),
        ("a b", BadInput, "may only contain"),
        ("tab\there", BadInput, "may only contain"),
        ("nl\n", BadInput, "may only contain"),
        ("base:ft", BadInput, "may only contain"),
        ("ünï", BadInput, "may only contain"),
        ("..", BadInput, "only dots"),
        ("cf-public-mine", FinetuneConflict, "reserved"),
        ("CF-PUBLIC-mine", FinetuneConflict, "reserved"),
        (str(uuid.uuid4()), BadInput, "must not be a UUID"),
        (uuid.uuid4().hex, BadInput, "must not be a UUID"),
    ],
)
def test_name_rules(reg: Registry, name: str, error: type[WorkersAIError], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        reg.create_finetune("alice", MODEL, name)
    assert info.value.code == 5006
    assert reg.list_finetunes("alice") == []


def test_longest_name_and_seed_style_id_are_fine(reg: Registry) -> None:
    reg.create_finetune("alice", MODEL, "x" * 128)
    # The seed page's placeholder id is one digit short of a UUID: a valid name, looked up by name.
    ft = reg.create_finetune("alice", MODEL, "00000000-0000-0000-0000-000000000")
    assert reg.get_finetune("alice", "00000000-0000-0000-0000-000000000") == ft


def test_other_fields_are_checked(reg: Registry) -> None:
    with pytest.raises(BadInput, match="model"):
        reg.create_finetune("alice", " ", "n")
    with pytest.raises(BadInput, match="description"):
        reg.create_finetune("alice", MODEL, "n", "d" * 4097)
    with pytest.raises(BadInput, match="public"):
        reg.create_finetune("alice", MODEL, "n", public="yes")  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError):
        reg.create_finetune("nobody", MODEL, "n")
    assert reg.list_finetunes("alice") == [] and reg.list_finetunes("nobody") == []


def test_names_are_unique_per_account_only(reg: Registry) -> None:
    reg.create_finetune("alice", MODEL, "shared")
    with pytest.raises(FinetuneConflict, match="already exists") as info:
        reg.create_finetune("alice", "@cf/other/model", "shared")
    assert info.value.code == 5006
    reg.create_finetune("bob", MODEL, "shared")
    assert [f.name for f in reg.list_finetunes("bob")] == ["shared"]


def test_account_cap(reg: Registry) -> None:
    for i in range(5):
        reg.create_finetune("alice", MODEL, f"n{i}")
    with pytest.raises(AccountLimitExceeded, match="at most 5") as info:
        reg.create_finetune("alice", MODEL, "n5")
    assert (info.value.code, info.value.status) == (3036, 429)
    reg.create_finetune("bob", MODEL, "n5")  # per account
    reg.delete_finetune("alice", "n0")
    reg.create_finetune("alice", MODEL, "n5")


def test_foreign_private_finetune_does_not_exist(reg: Registry) -> None:
    private = reg.create_finetune("alice", MODEL, "secret")
    public = reg.create_finetune("alice", MODEL, "open", public=True)
    for ref in (private.id, "secret"):
        with pytest.raises(FinetuneNotFound, match=f"Finetune {ref} not found"):
            reg.get_finetune("bob", ref)
        with pytest.raises(FinetuneNotFound):
            reg.delete_finetune("bob", ref)
        with pytest.raises(FinetuneNotFound):
            reg.adapter_for("bob", MODEL, ref)
    assert reg.get_finetune("bob", public.id) == public == reg.get_finetune("bob", "open")
    for ref in (public.id, "open"):
        with pytest.raises(FinetuneNotFound):
            reg.delete_finetune("bob", ref)  # visible, not deletable
    assert reg.list_finetunes("bob") == []
    assert {f.name for f in reg.list_finetunes("alice")} == {"secret", "open"}


def test_own_name_shadows_a_public_one_and_oldest_public_wins(reg: Registry) -> None:
    reg.create_token("carol")
    first = reg.create_finetune("alice", MODEL, "same", public=True)
    reg.create_finetune("carol", MODEL, "same", public=True)
    own = reg.create_finetune("bob", MODEL, "same")
    assert reg.get_finetune("bob", "same") == own
    assert reg.get_finetune("carol", "same").account_id == "carol"
    reg.create_token("dave")
    assert reg.get_finetune("dave", "same") == first


def test_list_public_paging_and_order(reg: Registry) -> None:
    made = [
        reg.create_finetune(acct, MODEL, name, public=True)
        for acct, name in [("alice", "c"), ("bob", "a"), ("alice", "b")]
    ]
    reg.create_finetune("bob", MODEL, "private")
    # Newest first; creates within one millisecond tie, and the id breaks the tie.
    newest_first = sorted(sorted(made, key=lambda f: f.id), key=lambda f: f.created_at, reverse=True)
    assert [f.name for f in reg.list_public()] == [f.name for f in newest_first]
    assert [f.name for f in reg.list_public(order_by="name")] == ["a", "b", "c"]
    assert [f.name for f in reg.list_public(order_by=PublicOrder.NAME, limit=2, offset=1)] == ["b", "c"]
    assert reg.list_public(offset=3) == []
    assert {f.name for f in reg.list_public(order_by="modified_at")} == {"a", "b", "c"}
    for bad in ({"order_by": "id; drop table finetunes"}, {"limit": 0}, {"limit": 1001}, {"offset": -1}):
        with pytest.raises(BadInput):
            reg.list_public(**bad)


def test_persistence_across_reopen(tmp_path: Path) -> None:
    with Registry.open(tmp_path) as reg:
        token = reg.create_token("alice")
        ft = reg.create_finetune("alice", MODEL, "kept", "d", public=True)
    with Registry.open(tmp_path) as reg:
        reg.authenticate("alice", token)
        assert reg.list_finetunes("alice") == [ft]
        assert reg.list_public() == [ft]


def test_migrations_create_the_schema_from_empty(tmp_path: Path) -> None:
    engine = make_engine(default_url(tmp_path))
    try:
        migrate(engine, tmp_path / "lock")
        migrate(engine, tmp_path / "lock")  # idempotent
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert MigrationContext.configure(conn).get_current_revision() == "0001"
    finally:
        engine.dispose()
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    try:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        assert {"accounts", "tokens", "finetunes", "finetune_assets", "alembic_version"} <= tables
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
    finally:
        db.close()


def test_sqlite_connections_survive_a_crash_and_a_power_loss(tmp_path: Path) -> None:
    # WAL (a kill -9 mid-commit leaves the last committed state) and synchronous=FULL (a commit is on
    # disk before it returns, so an answered upload or a printed token survives a power loss too).
    engine = make_engine(default_url(tmp_path))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("pragma journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("pragma synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("pragma foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(tmp_path: Path) -> None:
    engine = make_engine(default_url(tmp_path))
    try:
        migrate(engine, tmp_path / "lock")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("pragma foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("pragma busy_timeout").scalar() == 10_000
    finally:
        engine.dispose()


def test_explicit_database_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with Registry.open(tmp_path / "data", database_url=url) as reg:
        reg.create_token("alice")
    assert (tmp_path / "elsewhere.db").exists()
    assert not (tmp_path / "data" / "registry.sqlite3").exists()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select id from accounts").scalars().all() == ["alice"]
    finally:
        engine.dispose()


def test_concurrent_creates_respect_the_cap_and_unique_names(tmp_path: Path) -> None:
    with Registry.open(tmp_path, limits=RegistryLimits(max_finetunes_per_account=10)) as reg:
        reg.create_token("alice")
        made: list[Finetune] = []
        errors: list[Exception] = []

        def worker(i: int) -> None:
            for j in range(6):
                try:
                    # Every name is tried by two threads: one wins, one conflicts (or hits the cap).
                    made.append(reg.create_finetune("alice", MODEL, f"n{(i // 2)}-{j}"))
                except (AccountLimitExceeded, FinetuneConflict) as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == 10 and len(errors) == 26
        assert len({f.name for f in made}) == 10
        assert len(reg.list_finetunes("alice")) == 10


def test_registry_never_imports_torch() -> None:
    code = (
        "import sys, loraserve.registry, loraserve.registry.synth; assert 'torch' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

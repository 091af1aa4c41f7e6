"""The same registry code on PostgreSQL: a throwaway server (initdb + pg_ctl, unix socket only) per module.

Skipped only where the machine has no PostgreSQL server binaries or no psycopg driver.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from loraserve.errors import (
    AccountLimitExceeded,
    AuthenticationError,
    FinetuneConflict,
    FinetuneNotFound,
    InvalidFinetune,
)
from loraserve.registry import Finetune, Registry, RegistryLimits, synth
from loraserve.registry.schema import Base

from pg_helpers import PostgresServer

BASE = synth.llama_model_info()
MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    """A fresh server for this module; stopped and removed afterwards."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A new, empty database for each test."""
    return pg_server.new_database()


def test_migrations_build_the_schema(pg_url: str, tmp_path: Path) -> None:
    Registry.open(tmp_path, pg_url).close()
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn)
            assert ctx.get_current_revision() == "0001"
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()
    assert not (tmp_path / "registry.sqlite3").exists()


def test_accounts_finetunes_and_visibility(pg_url: str, tmp_path: Path) -> None:
    with Registry.open(tmp_path, pg_url) as reg:
        token = reg.create_token("alice")
        reg.create_token("bob")
        reg.authenticate("alice", token)
        with pytest.raises(AuthenticationError):
            reg.authenticate("bob", token)
        private = reg.create_finetune("alice", MODEL, "private")
        public = reg.create_finetune("alice", MODEL, "public", public=True)
        with pytest.raises(FinetuneConflict):
            reg.create_finetune("alice", MODEL, "private")
        reg.create_finetune("bob", MODEL, "private")
        assert reg.get_finetune("alice", "private") == private == reg.get_finetune("alice", private.id)
        with pytest.raises(FinetuneNotFound):
            reg.get_finetune("bob", private.id)
        assert reg.get_finetune("bob", "public") == public
        assert [f.name for f in reg.list_public(order_by="name")] == ["public"]
        with pytest.raises(FinetuneNotFound):
            reg.delete_finetune("bob", public.id)
        assert reg.revoke_token(token)
        with pytest.raises(AuthenticationError):
            reg.authenticate("alice", token)
    with Registry.open(tmp_path, pg_url) as reg:
        assert [f.name for f in reg.list_finetunes("alice")] == ["private", "public"]
        assert reg.delete_finetune("alice", "public") == public
        assert [f.name for f in reg.list_finetunes("alice")] == ["private"]


def test_uploads(pg_url: str, tmp_path: Path) -> None:
    with Registry.open(tmp_path, pg_url, RegistryLimits(max_rank=8)) as reg:
        reg.create_token("alice")
        ft = reg.create_finetune("alice", MODEL, "mine")
        reg.add_asset("alice", "mine", "adapter_config.json", io.BytesIO(synth.adapter_config(4, 8)), BASE)
        mismatched = synth.encode_safetensors(synth.lora_tensors(BASE, 2))
        with pytest.raises(InvalidFinetune, match="rank 2, expected 4"):
            reg.add_asset("alice", "mine", "adapter_model.safetensors", io.BytesIO(mismatched), BASE)
        assert not reg.get_finetune("alice", ft.id).has_weights
        for seed in (1, 2):
            blob = synth.encode_safetensors(synth.lora_tensors(BASE, 4, seed=seed))
            reg.add_asset("alice", "mine", "adapter_model.safetensors", io.BytesIO(blob), BASE)
        finetune, ref = reg.adapter_for("alice", MODEL, "mine")
        assert finetune.ready and (Path(ref.path) / "adapter_model.safetensors").read_bytes() == blob


def test_concurrent_creates_keep_the_cap_exact(pg_url: str, tmp_path: Path) -> None:
    with Registry.open(tmp_path, pg_url, RegistryLimits(max_finetunes_per_account=10)) as reg:
        reg.create_token("alice")
        made: list[Finetune] = []
        refused: list[Exception] = []

        def worker(i: int) -> None:
            for j in range(6):
                try:
                    made.append(reg.create_finetune("alice", MODEL, f"n{i // 2}-{j}"))
                except (AccountLimitExceeded, FinetuneConflict) as exc:
                    refused.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (len(made), len(refused)) == (10, 26)
        assert len(reg.list_finetunes("alice")) == 10

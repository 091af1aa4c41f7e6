"""The registry on a remote adapter store (store_remote.py, store_cache.py), on memory://, file:// and a
real S3 (moto): an upload is in the store before its record commits, a second registry with an empty
local dir sharing the database fetches and verifies what it runs, a stale or tampered copy is never
used, a delete removes the objects, a store that fails is a 429 with nothing committed, and startup
recovery holds nothing in the cache against the database. Over real HTTP, with a `loraserve serve`
replica: test_store_s3.py."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from loraserve.errors import FinetuneNotFound, InvalidFinetune
from loraserve.registry import AssetFile, Finetune, Registry, RegistryLimits, synth
from loraserve.registry.database import default_url
from loraserve.registry.schema import AssetRow
from loraserve.registry.store import AdapterStoreConfig, AdapterStoreUnavailable, StoreScheme
from loraserve.registry.store_remote import RemoteStore

from s3_helpers import BUCKET, S3Server, running_s3

BASE = synth.llama_model_info()
MODEL = "@cf/meta-llama/llama-2-7b-chat-hf-lora"
CONFIG, WEIGHTS = AssetFile.CONFIG, AssetFile.WEIGHTS
LIMITS = RegistryLimits(max_rank=8, max_file_bytes=8 * 1024)


def weights(r: int = 4, seed: int = 0) -> bytes:
    return synth.encode_safetensors(synth.lora_tensors(BASE, r, targets=("q_proj", "v_proj"), seed=seed))


def config(r: int = 4) -> bytes:
    return synth.adapter_config(r, 2 * r, ("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(params=["memory", "file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStoreConfig:
    prefix = f"t-{uuid.uuid4().hex[:12]}"  # memory:// is one dict per process, S3 one bucket per module
    if request.param == "memory":
        return AdapterStoreConfig(f"memory://{prefix}")
    if request.param == "file":
        return AdapterStoreConfig(f"file://{tmp_path / 'store'}")
    request.getfixturevalue("s3")
    return AdapterStoreConfig(f"s3://{BUCKET}/{prefix}")


@pytest.fixture
def gateway(tmp_path: Path, store: AdapterStoreConfig) -> Iterator[Registry]:
    with Registry.open(tmp_path / "gateway", limits=LIMITS, store=store) as r:
        for account in ("alice", "bob"):
            r.create_token(account)
        yield r


@pytest.fixture
def replica(tmp_path: Path, gateway: Registry, store: AdapterStoreConfig) -> Iterator[Registry]:
    """Another machine: its own empty data dir, the same database and store."""
    with Registry.open(tmp_path / "replica", default_url(gateway.data_dir), LIMITS, store) as r:
        yield r


@pytest.fixture
def ft(gateway: Registry) -> Finetune:
    return gateway.create_finetune("alice", MODEL, "mine")


def remote(reg: Registry) -> RemoteStore:
    assert isinstance(reg.store, RemoteStore)
    return reg.store


def upload(reg: Registry, file: AssetFile, blob: bytes, ref: str = "mine") -> None:
    reg.add_asset("alice", ref, file.value, io.BytesIO(blob), BASE)


def objects(reg: Registry, ft: Finetune) -> dict[str, bytes]:
    store = remote(reg)
    return {key: store.fs.cat_file(key) for key in store.fs.find(store.prefix(ft.id))}


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def key(reg: Registry, ft: Finetune, file: AssetFile, blob: bytes) -> str:
    return remote(reg).key(ft.id, file, sha256(blob))


def cached(file: AssetFile, blob: bytes) -> str:
    return f".cached-{sha256(blob)}-{file.value}"


def local_files(reg: Registry, ft: Finetune) -> dict[str, bytes]:
    d = reg.storage.directory(ft.id)
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} if d.exists() else {}


def test_an_upload_is_in_the_store_before_its_record_commits(gateway: Registry, ft: Finetune) -> None:
    seen: list[tuple[str, bool]] = []

    def check(session: Session) -> None:
        for row in session.identity_map.values():
            if isinstance(row, AssetRow):
                key = remote(gateway).key(row.finetune_id, AssetFile(row.file_name), row.sha256)
                seen.append((row.file_name, remote(gateway).fs.exists(key)))

    event.listen(gateway._sessions, "before_commit", check)
    try:
        upload(gateway, CONFIG, config())
        upload(gateway, WEIGHTS, weights())
    finally:
        event.remove(gateway._sessions, "before_commit", check)
    assert seen == [(CONFIG.value, True), (WEIGHTS.value, True)]
    assert objects(gateway, ft) == {key(gateway, ft, CONFIG, config()): config(),
                                    key(gateway, ft, WEIGHTS, weights()): weights()}
    # The gateway keeps its validated upload as its cached copy: the engine's paths are links to it.
    d = gateway.storage.directory(ft.id)
    assert (d / WEIGHTS.value).is_symlink() and (d / WEIGHTS.value).read_bytes() == weights()
    assert gateway.adapter_for("alice", MODEL, "mine")[0].ready


def test_a_replica_with_an_empty_local_dir_fetches_what_it_runs(
    gateway: Registry, replica: Registry, ft: Finetune
) -> None:
    upload(gateway, CONFIG, config())
    upload(gateway, WEIGHTS, weights())
    assert not replica.storage.directory(ft.id).exists()
    assert replica.get_finetune("alice", "mine").ready  # the record says so; nothing fetched for that
    assert not replica.storage.directory(ft.id).exists()
    finetune, ref = replica.adapter_for("alice", MODEL, "mine")
    assert finetune.ready and Path(ref.path) == replica.storage.directory(ft.id)
    assert local_files(replica, ft) == {
        CONFIG.value: config(), WEIGHTS.value: weights(),
        cached(CONFIG, config()): config(), cached(WEIGHTS, weights()): weights(),
    }
    assert all((Path(ref.path) / f.value).is_symlink() for f in AssetFile)
    inode = (Path(ref.path) / WEIGHTS.value).stat().st_ino
    replica.adapter_for("alice", MODEL, ft.id)
    assert (Path(ref.path) / WEIGHTS.value).stat().st_ino == inode  # a current copy is not fetched again


def test_a_reupload_elsewhere_replaces_the_replicas_copy(
    gateway: Registry, replica: Registry, ft: Finetune
) -> None:
    upload(gateway, CONFIG, config())
    upload(gateway, WEIGHTS, weights(seed=1))
    replica.adapter_for("alice", MODEL, "mine")
    upload(gateway, WEIGHTS, weights(seed=2))
    ref = replica.adapter_for("alice", MODEL, "mine")[1]
    assert (Path(ref.path) / WEIGHTS.value).read_bytes() == weights(seed=2)
    copies = sorted(p.name for p in Path(ref.path).iterdir() if p.name.startswith(".cached-"))
    assert copies == sorted([cached(CONFIG, config()), cached(WEIGHTS, weights(seed=2))])
    # Superseded versions stay in the store until the finetune goes (see store_remote.py's docstring).
    assert key(gateway, ft, WEIGHTS, weights(seed=1)) in objects(gateway, ft)


def test_the_cross_check_on_a_replica_reads_the_stores_copy(
    gateway: Registry, replica: Registry, ft: Finetune
) -> None:
    upload(gateway, WEIGHTS, weights(r=4))
    with pytest.raises(InvalidFinetune, match="rank"):
        upload(replica, CONFIG, config(r=2))
    upload(replica, CONFIG, config(r=4))
    assert gateway.adapter_for("alice", MODEL, "mine")[0].ready


@pytest.mark.parametrize("how", ["other bytes", "longer", "missing"])
def test_a_tampered_or_missing_object_is_refused(
    gateway: Registry, replica: Registry, ft: Finetune, how: str
) -> None:
    upload(gateway, CONFIG, config())
    upload(gateway, WEIGHTS, weights())
    fs, target = remote(gateway).fs, key(gateway, ft, WEIGHTS, weights())
    if how == "missing":
        fs.rm(target)
    else:
        fs.pipe_file(target, weights(seed=9) if how == "other bytes" else weights() + b"\0")
    why = "is missing from the adapter store" if how == "missing" else "does not match the sha256"
    with pytest.raises(InvalidFinetune, match=why) as info:
        replica.adapter_for("alice", MODEL, "mine")
    assert (info.value.status, info.value.code) == (400, 3039)
    assert WEIGHTS.value not in local_files(replica, ft)
    assert not list(replica.storage.directory(ft.id).glob(".upload-*"))


def test_delete_removes_the_objects(gateway: Registry, replica: Registry, ft: Finetune) -> None:
    gateway.create_finetune("alice", MODEL, "other")  # a non-empty table: recovery removes orphans
    upload(gateway, CONFIG, config())
    upload(gateway, WEIGHTS, weights())
    replica.adapter_for("alice", MODEL, "mine")
    replica.delete_finetune("alice", "mine")
    assert objects(gateway, ft) == {}
    assert not replica.storage.directory(ft.id).exists()
    with pytest.raises(FinetuneNotFound):
        gateway.adapter_for("alice", MODEL, "mine")
    assert gateway.storage.directory(ft.id).exists()  # the gateway's own cache: garbage until its restart
    assert gateway.recover().orphan_dirs_removed == [ft.id]


def test_a_commit_that_fails_after_the_put_leaves_only_garbage(gateway: Registry, ft: Finetune) -> None:
    upload(gateway, CONFIG, config())

    def fail(_session: Session) -> None:
        raise OSError("disk I/O error")

    event.listen(gateway._sessions, "before_commit", fail)
    try:
        with pytest.raises(OSError, match="disk I/O error"):
            upload(gateway, WEIGHTS, weights())
    finally:
        event.remove(gateway._sessions, "before_commit", fail)
    assert not gateway.get_finetune("alice", "mine").has_weights
    assert key(gateway, ft, WEIGHTS, weights()) in objects(gateway, ft)  # unreferenced: harmless
    assert sorted(local_files(gateway, ft)) == sorted([CONFIG.value, cached(CONFIG, config())])
    upload(gateway, WEIGHTS, weights())
    assert gateway.adapter_for("alice", MODEL, "mine")[0].ready


def test_recovery_holds_nothing_in_the_cache_against_the_database(
    gateway: Registry, replica: Registry, ft: Finetune
) -> None:
    upload(gateway, CONFIG, config())
    upload(gateway, WEIGHTS, weights())
    report = replica.recover()  # a replica that never ran it: nothing local, and that is fine
    assert report.clean and report.finetunes_checked == 1
    assert not replica.storage.directory(ft.id).exists() and replica.get_finetune("alice", "mine").ready
    d = Path(replica.adapter_for("alice", MODEL, "mine")[1].path)
    before = local_files(replica, ft)
    dead = d / ".upload-0123456789abcdef.tmp"
    dead.write_bytes(b"half a fetch")
    leftovers = [d / ".link-0123456789abcdef", d / f".cached-{'0' * 64}-{WEIGHTS.value}"]
    os.symlink(leftovers[1].name, leftovers[0])
    leftovers[1].write_bytes(weights(seed=3))
    report = replica.recover()
    assert report.temp_files_removed == [dead] and report.files_invalidated == []
    assert local_files(replica, ft) == before and not any(p.exists() or p.is_symlink() for p in leftovers)
    (d / WEIGHTS.value).unlink()  # a lost copy: fetched again, never a reason to clear the record
    assert replica.recover().clean and gateway.get_finetune("alice", "mine").ready
    assert replica.adapter_for("alice", MODEL, "mine")[0].ready and local_files(replica, ft) == before


@contextmanager
def outage(store: AdapterStoreConfig, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The store fails while inside; yields how its error names it. S3: the server is stopped (and
    started again with what it held); file://: its directory is a file meanwhile (root ignores modes)."""
    if store.scheme is StoreScheme.S3:
        s3: S3Server = request.getfixturevalue("s3")
        fs = s3.fs()
        held = {k: fs.cat_file(k) for k in fs.find(BUCKET)}
        s3.stop()
        try:
            yield store.url
        finally:
            s3.start()
            s3.create_bucket()
            for k, blob in held.items():
                fs.pipe_file(k, blob)
        return
    root = tmp_path / "store"
    root.rename(tmp_path / "away")
    root.write_bytes(b"")
    try:
        yield store.url
    finally:
        root.unlink()
        (tmp_path / "away").rename(root)


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_a_failing_store_commits_nothing_and_recovers(
    gateway: Registry, replica: Registry, ft: Finetune, store: AdapterStoreConfig, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    upload(gateway, CONFIG, config())
    upload(gateway, WEIGHTS, weights())
    calls: list[Callable[[], object]] = [
        lambda: upload(gateway, WEIGHTS, weights(seed=1)),
        lambda: replica.adapter_for("alice", MODEL, "mine"),  # nothing cached on the replica
    ]
    if store.scheme is StoreScheme.S3:  # fsspec's local find() does not fail: a file:// delete goes through
        calls.append(lambda: gateway.delete_finetune("alice", "mine"))
    with outage(store, tmp_path, request) as name:
        for call in calls:
            with pytest.raises(AdapterStoreUnavailable, match=f"adapter store {name} is unreachable") as info:
                call()
            assert (info.value.status, info.value.code) == (429, 3040)
        assert gateway.get_finetune("alice", "mine").ready  # still there, still the first weights
    assert local_files(gateway, ft)[WEIGHTS.value] == weights()
    assert not list(gateway.storage.directory(ft.id).glob(".upload-*"))
    assert WEIGHTS.value not in local_files(replica, ft)
    assert objects(gateway, ft).keys() == {key(gateway, ft, f, b) for f, b in ((CONFIG, config()),
                                                                           (WEIGHTS, weights()))}
    # The store is back: the same calls work.
    ref = replica.adapter_for("alice", MODEL, "mine")[1]
    assert (Path(ref.path) / WEIGHTS.value).read_bytes() == weights()
    upload(gateway, WEIGHTS, weights(seed=1))
    gateway.delete_finetune("alice", "mine")
    assert objects(gateway, ft) == {}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host/x", "must start with s3://, file://, memory://"),
        ("s3:///prefix", "name the bucket"),
        ("s3://key:secret@bucket/prefix", "no query, fragment or credentials"),
        ("s3://bucket/prefix?region=x", "no query, fragment or credentials"),
        ("file://relative/path", "absolute path"),
        ("/just/a/path", "must start with"),
    ],
)
def test_bad_store_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        AdapterStoreConfig(url)


def test_serve_refuses_a_bad_store_url_before_loading(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loraserve", "serve", "--data-dir", str(tmp_path), "--adapter-store", "s3://"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and "--adapter-store 's3://': name the bucket" in done.stderr

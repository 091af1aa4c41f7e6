"""Adapter files in S3 (moto's real server) behind real HTTP: an upload through one gateway (a server in
this process) is in S3 before its record commits, and runs on a replica that shares only the database
and the bucket: `loraserve serve --adapter-store s3://... --database-url ...` in a process of its own,
with an empty data dir and S3's endpoint and credentials from the AWS_* environment. A delete removes
the objects, a tampered object is refused, and an S3 outage is a 429 / 3040 naming the store with
nothing committed, until S3 is back. The registry-level cases: test_store_remote.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from loraserve.api import BackgroundServer, ServerSettings, create_app
from loraserve.registry import Registry
from loraserve.registry.database import default_url
from loraserve.registry.schema import AssetRow
from loraserve.registry.store import AdapterStoreConfig

from conftest import LORA_MODEL, Account, LiveServer, create_finetune, fails, ok, upload
from s3_helpers import BUCKET, S3Server, running_s3
from serve_helpers import ServeProcess

PREFIX = "adapters"
STORE = f"s3://{BUCKET}/{PREFIX}"
FILES = ("adapter_config.json", "adapter_model.safetensors")
BODY: dict[str, Any] = {"prompt": "tell me a story", "max_tokens": 8, "temperature": 0}


@dataclass
class Cluster:
    gateway: LiveServer
    replica: LiveServer  # its registry is the gateway's: the database is what they share
    replica_dir: Path
    s3: S3Server
    account: Account

    def objects(self, finetune_id: str) -> dict[str, bytes]:
        fs = self.s3.fs()
        return {k: fs.cat_file(k) for k in fs.find(f"{BUCKET}/{PREFIX}/{finetune_id}")}

    def cached(self, finetune_id: str) -> list[str]:
        d = self.replica_dir / "finetunes" / finetune_id
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: S3Server, tiny_backend: Any) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    registry = Registry.open(root / "gateway", store=AdapterStoreConfig(STORE))
    backends = {LORA_MODEL: tiny_backend}
    app = create_app(registry, backends, ServerSettings(rate_limit_per_minute=0))
    with BackgroundServer(app) as live, ServeProcess(  # its port is picked once the gateway's is taken
        root / "replica", root / "replica.log", [f"{LORA_MODEL}=random:tiny"],
        extra_args=("--database-url", default_url(registry.data_dir), "--adapter-store", STORE),
        env=s3.env(),
    ) as replica:
        replica.start(timeout=120)
        gateway = LiveServer(live.base_url, registry, backends)
        yield Cluster(gateway, LiveServer(replica.base_url, registry, {}), root / "replica", s3,
                      gateway.new_account())
    registry.close()


def run(server: LiveServer, account: Account, **extra: Any) -> httpx.Response:
    return httpx.post(server.run_url(account), headers=account.headers, json={**BODY, **extra}, timeout=60)


def test_an_upload_through_one_gateway_runs_on_any_replica(cluster: Cluster, peft_adapter: Any) -> None:
    folder: Path = peft_adapter()
    in_s3_at_commit: list[tuple[str, bool]] = []
    fs = cluster.s3.fs()

    def check(session: Session) -> None:
        for row in session.identity_map.values():
            if isinstance(row, AssetRow):
                key = f"{BUCKET}/{PREFIX}/{row.finetune_id}/{row.sha256}/{row.file_name}"
                in_s3_at_commit.append((row.file_name, fs.exists(key)))

    event.listen(cluster.gateway.registry._sessions, "before_commit", check)
    try:
        finetune = create_finetune(cluster.gateway, cluster.account, "everywhere", folder)
    finally:
        event.remove(cluster.gateway.registry._sessions, "before_commit", check)
    assert in_s3_at_commit == [(name, True) for name in FILES]
    assert cluster.objects(finetune["id"]) == {
        f"{BUCKET}/{PREFIX}/{finetune['id']}/{hashlib.sha256(blob).hexdigest()}/{name}": blob
        for name in FILES for blob in [(folder / name).read_bytes()]
    }
    assert cluster.cached(finetune["id"]) == []  # the replica has never seen it
    on_replica = ok(run(cluster.replica, cluster.account, lora="everywhere"))
    assert cluster.cached(finetune["id"]) == list(FILES)
    on_gateway = ok(run(cluster.gateway, cluster.account, lora=finetune["id"]))
    plain = ok(run(cluster.replica, cluster.account))
    # Same seed, same random weights, greedy: the replica applied the very adapter the gateway did.
    assert on_replica["response"] == on_gateway["response"] != plain["response"]


def test_a_delete_through_the_replica_removes_the_objects(cluster: Cluster, peft_adapter: Any) -> None:
    finetune = create_finetune(cluster.gateway, cluster.account, "short-lived", peft_adapter())
    ok(run(cluster.replica, cluster.account, lora="short-lived"))
    assert len(cluster.objects(finetune["id"])) == 2
    url = f"{cluster.replica.ai_url(cluster.account)}/finetunes/{finetune['id']}"
    assert ok(httpx.delete(url, headers=cluster.account.headers))["id"] == finetune["id"]
    assert cluster.objects(finetune["id"]) == {} and cluster.cached(finetune["id"]) == []
    fails(run(cluster.gateway, cluster.account, lora=finetune["id"]), 404, 3037)


def test_a_tampered_object_is_refused(cluster: Cluster, peft_adapter: Any) -> None:
    folder: Path = peft_adapter()
    finetune = create_finetune(cluster.gateway, cluster.account, "tampered", folder)
    weights = (folder / FILES[1]).read_bytes()
    key = f"{BUCKET}/{PREFIX}/{finetune['id']}/{hashlib.sha256(weights).hexdigest()}/{FILES[1]}"
    cluster.s3.fs().pipe_file(key, weights[:-4] + b"\0\0\0\0")  # same size, other bytes
    message = fails(run(cluster.replica, cluster.account, lora="tampered"), 400, 3039)
    assert f"{FILES[1]} in the adapter store {STORE} does not match the sha256" in message
    assert FILES[1] not in cluster.cached(finetune["id"])


def test_an_s3_outage_is_a_429_that_commits_nothing_until_s3_is_back(
    cluster: Cluster, peft_adapter: Any
) -> None:
    folder: Path = peft_adapter()
    cold = create_finetune(cluster.gateway, cluster.account, "cold", folder)  # never run on the replica
    fresh = create_finetune(cluster.gateway, cluster.account, "fresh")  # no files yet
    fs = cluster.s3.fs()
    held = {k: fs.cat_file(k) for k in fs.find(BUCKET)}
    cluster.s3.stop()
    try:
        unavailable = f"the adapter store {STORE} is unreachable"
        for response in (
            run(cluster.replica, cluster.account, lora="cold"),
            run(cluster.replica, cluster.account, lora="cold", stream=True),
            upload(cluster.gateway, cluster.account, "fresh", FILES[0], (folder / FILES[0]).read_bytes()),
            httpx.delete(f"{cluster.gateway.ai_url(cluster.account)}/finetunes/cold",
                         headers=cluster.account.headers),
        ):
            assert unavailable in fails(response, 429, 3040)
        # Nothing committed: the upload's flag is unset, the delete did not happen, no temp file is left.
        assert not cluster.gateway.registry.get_finetune(cluster.account.id, "fresh").has_config
        assert [f["name"] for f in ok(httpx.get(f"{cluster.gateway.ai_url(cluster.account)}/finetunes",
                                                headers=cluster.account.headers))][-2:] == ["cold", "fresh"]
        assert not list((cluster.gateway.registry.storage.root / fresh["id"]).glob(".upload-*"))
        assert cluster.cached(cold["id"]) == []
    finally:
        cluster.s3.start()  # S3 is back, with what it held (moto's own state is in memory: put it back)
        cluster.s3.create_bucket()
        for k, blob in held.items():
            fs.pipe_file(k, blob)
    ok(run(cluster.replica, cluster.account, lora="cold"))
    ok(upload(cluster.gateway, cluster.account, "fresh", FILES[0], (folder / FILES[0]).read_bytes()))
    ok(httpx.delete(f"{cluster.gateway.ai_url(cluster.account)}/finetunes/cold",
                    headers=cluster.account.headers))
    assert cluster.objects(cold["id"]) == {}

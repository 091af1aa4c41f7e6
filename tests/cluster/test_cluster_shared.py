"""Shared state with real servers, on a real local Ray: two gateway replicas and two engine replicas of
random:tiny behind Serve's proxy, adapter files in moto's S3, the rate limit in a real Redis, the registry
on a real PostgreSQL. One Ray, one application, one S3 and one PostgreSQL for the module (starting them is
the slow part); the engine replicas take requests by Serve's plain load choice (`adapter_affinity=False`),
so that one adapter's runs reach both.

What is checked: an upload through a gateway is in the store, and runs on both engine replicas, each
fetching the version the request names into the replicas' cache tier (not the gateway's data dir); a
re-upload is served in its new version by replicas that ran the old one; an object missing from the store
fails the run with 400 / 3039, an unreachable store with 429 / 3040; one account's rate limit holds across
both gateways; the database stopped under the gateways is a 429 / 3040 naming it, and they serve again
once it is back. And, without Ray, a replica's fetches step by step (`ReplicaAdapters` over a `file://`
store).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraserve.api import ServerSettings
from loraserve.errors import InvalidFinetune
from loraserve.registry import Registry, synth
from loraserve.registry.records import AssetFile
from loraserve.registry.storage import AssetDigest
from loraserve.registry.store import AdapterStoreUnavailable
from loraserve.registry.store_cache import blob_name
from loraserve.types import AdapterRef, StreamEvent

from conftest import LORA_MODEL, Account, LiveServer, fails, ok, upload
from pg_helpers import PostgresServer
from redis_helpers import RedisServer
from s3_helpers import BUCKET, S3Server, running_s3

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'loraserve[cluster]'")
from loraserve.cluster.adapters import ReplicaAdapters, StoredAdapter, fetch_failed
from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.protocol import Refused, Started
from loraserve.cluster.replica_header import GATEWAY_HEADER, REPLICA_HEADER
from loraserve.tools.routing_bench.cluster import application, local_serve

# random:tiny as the engine builds it (SmolLM2's vocabulary, 2 layers, hidden 64).
TINY = synth.llama_model_info(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                              vocab_size=49152, context_window=2048)
TIMEOUT = httpx.Timeout(60.0, connect=5.0)
RUN = {"prompt": "tell me a story", "max_tokens": 8, "temperature": 0}
RATE_LIMIT = 6  # runs per account per minute: every test spreads its runs over fresh accounts
PREFIX = "adapters"
# Runs sent at once to reach both engine replicas: sent one after another, Serve's router may keep choosing
# the replica whose queue length it has cached.
SPREAD_RUNS = 16
# Every projection, and a large alpha: random:tiny's greedy text then differs from the base model's and
# between two adapters (with q and v alone at alpha 16 it does not).
TARGETS = tuple(TINY.lora_shapes)
WEIGHTS = AssetFile.WEIGHTS


@dataclass
class Shared:
    server: LiveServer
    s3: S3Server
    database: PostgresServer
    replica_cache: Path
    gateway_tier: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Shared]:
    data_dir = tmp_path_factory.mktemp("shared-data")
    with running_s3(tmp_path_factory.mktemp("s3")) as s3, PostgresServer() as database:
        database_url = database.new_database()
        # The test's own view of the database (tokens); opening it migrates, as `loraserve serve` does.
        registry = Registry.open(data_dir, database_url)
        config = ClusterConfig(
            models=(f"{LORA_MODEL}=random:tiny",), data_dir=data_dir, database_url=database_url,
            adapter_store=f"s3://{BUCKET}/{PREFIX}",
            replicas=2, gateways=2, adapter_affinity=False, engine_num_cpus=1, gateway_num_cpus=0.5,
            stats_interval_s=0.25, engine={"max_num_seqs": 4, "max_queue": 8},
            server=ServerSettings(rate_limit_per_minute=RATE_LIMIT, redis_url=redis_server.url))
        try:
            with local_serve(num_cpus=8) as base_url, application(config):
                yield Shared(LiveServer(base_url, registry, {}), s3, database,
                             config.replica_cache, data_dir / "finetunes")
        finally:
            registry.close()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def _weights(seed: int) -> bytes:
    return synth.encode_safetensors(synth.lora_tensors(TINY, 8, TARGETS, seed=seed))


def _public_finetune(http: httpx.Client, shared: Shared, name: str, seed: int) -> tuple[Account, str]:
    """A public finetune made and uploaded through a gateway, so that fresh accounts can run it."""
    owner = shared.server.new_account()
    created = ok(http.post(f"{shared.server.ai_url(owner)}/finetunes", headers=owner.headers,
                           json={"model": LORA_MODEL, "name": name, "description": "", "public": True}))
    finetune_id: str = created["id"]
    config = synth.adapter_config(8, 64, TARGETS)
    ok(upload(shared.server, owner, finetune_id, AssetFile.CONFIG.value, config))
    ok(upload(shared.server, owner, finetune_id, WEIGHTS.value, _weights(seed)))
    return owner, finetune_id


def _spread_runs(shared: Shared, **inputs: Any) -> list[httpx.Response]:
    """SPREAD_RUNS runs, eight at a time, each account making fewer than the rate limit allows."""
    accounts = [shared.server.new_account() for _ in range(SPREAD_RUNS // (RATE_LIMIT - 1) + 1)]

    def one(i: int) -> httpx.Response:
        account = accounts[i % len(accounts)]
        with httpx.Client(timeout=TIMEOUT) as client:
            return client.post(shared.server.run_url(account), headers=account.headers,
                               json={**RUN, **inputs})

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(SPREAD_RUNS)))


def _runs(http: httpx.Client, shared: Shared, count: int, **inputs: Any) -> list[httpx.Response]:
    """`count` runs, each account making fewer than the rate limit allows."""
    responses = []
    for i in range(count):
        if i % (RATE_LIMIT - 1) == 0:
            account = shared.server.new_account()
        responses.append(http.post(shared.server.run_url(account), headers=account.headers,
                                   json={**RUN, **inputs}))
    return responses


def _texts_by_replica(responses: list[httpx.Response]) -> dict[str, set[str]]:
    texts: dict[str, set[str]] = {}
    for response in responses:
        text = ok(response)["response"]
        texts.setdefault(response.headers[REPLICA_HEADER], set()).add(text)
    return texts


def _stored(s3: S3Server, finetune_id: str) -> set[str]:
    """The keys under the finetune's prefix, relative to it: `<sha256>/<file name>`."""
    root = f"{BUCKET}/{PREFIX}/{finetune_id}/"
    return {key.removeprefix(root) for key in s3.fs().find(root)}


def _cached(tier: Path, finetune_id: str) -> str | None:
    """The blob the tier's weights path links to, or None."""
    path = tier / finetune_id / WEIGHTS.value
    return os.readlink(path) if path.is_symlink() else None


def test_an_upload_runs_on_every_engine_replica_and_a_reupload_in_its_new_version(
        shared: Shared, http: httpx.Client) -> None:
    owner, finetune_id = _public_finetune(http, shared, "shared", seed=1)
    v1, v2 = hashlib.sha256(_weights(1)).hexdigest(), hashlib.sha256(_weights(2)).hexdigest()
    # In the store once the upload answered (the gateway PUTs it before the record commits).
    assert f"{v1}/{WEIGHTS.value}" in _stored(shared.s3, finetune_id)
    assert _cached(shared.replica_cache, finetune_id) is None  # the upload cached it in the gateway's tier
    assert _cached(shared.gateway_tier, finetune_id) == blob_name(WEIGHTS, v1)

    base = set.union(*_texts_by_replica(_runs(http, shared, 2)).values())
    before = _texts_by_replica(_spread_runs(shared, lora=finetune_id))
    assert len(before) == 2, f"one adapter's runs all went to one engine replica: {before}"
    [text_v1] = set.union(*before.values())  # greedy: the same text on every replica
    assert {text_v1} != base  # the adapter took part
    # The engine replicas fetched the version the gateway named into their own tier.
    assert _cached(shared.replica_cache, finetune_id) == blob_name(WEIGHTS, v1)

    ok(upload(shared.server, owner, finetune_id, WEIGHTS.value, _weights(2)))
    assert {f"{v1}/{WEIGHTS.value}", f"{v2}/{WEIGHTS.value}"} <= _stored(shared.s3, finetune_id)
    after = _texts_by_replica(_spread_runs(shared, lora=finetune_id))
    assert after.keys() == before.keys(), f"the new version did not run on both replicas: {after}"
    [text_v2] = set.union(*after.values())
    assert text_v2 != text_v1
    assert _cached(shared.replica_cache, finetune_id) == blob_name(WEIGHTS, v2)
    # The old copy went with the link that named it.
    assert not (shared.replica_cache / finetune_id / blob_name(WEIGHTS, v1)).exists()


def test_an_object_missing_from_the_store_fails_the_run_with_3039(shared: Shared, http: httpx.Client) -> None:
    _, finetune_id = _public_finetune(http, shared, "lost", seed=3)
    shared.s3.fs().rm(f"{BUCKET}/{PREFIX}/{finetune_id}", recursive=True)
    # The gateway's tier still holds the upload: only the engine replica finds the object gone.
    [refused] = _runs(http, shared, 1, lora=finetune_id)
    assert "missing from the adapter store" in fails(refused, 400, 3039)
    assert refused.headers[REPLICA_HEADER]


def test_one_accounts_rate_limit_holds_across_two_gateways(shared: Shared, http: httpx.Client) -> None:
    account = shared.server.new_account()

    def run(_: int) -> httpx.Response:
        return http.post(shared.server.run_url(account), headers=account.headers, json=RUN)

    # At once, so that Serve's proxy spreads them over both gateways by their queues.
    with ThreadPoolExecutor(max_workers=2 * RATE_LIMIT) as pool:
        responses = list(pool.map(run, range(2 * RATE_LIMIT)))
    assert len({response.headers[GATEWAY_HEADER] for response in responses}) == 2
    assert sum(response.status_code == 200 for response in responses) == RATE_LIMIT
    for refused in (response for response in responses if response.status_code != 200):
        fails(refused, 429, 3036)


def test_a_replica_fetches_the_version_named_and_its_engine_forgets_an_older_one(tmp_path: Path) -> None:
    """ReplicaAdapters on its own, over a `file://` store: what the replicas above do, with each step in
    view."""
    finetune_id = str(uuid.uuid4())
    store, cache = tmp_path / "store", tmp_path / "cache"

    def put(file: AssetFile, blob: bytes) -> tuple[AssetFile, AssetDigest]:
        digest = AssetDigest(len(blob), hashlib.sha256(blob).hexdigest())
        key = store / finetune_id / digest.sha256 / file.value
        key.parent.mkdir(parents=True)
        key.write_bytes(blob)
        return file, digest

    def stored(*version: tuple[AssetFile, AssetDigest]) -> StoredAdapter:
        return StoredAdapter(finetune_id, "/the/gateway's/copy", f"file://{store}", str(cache), version)

    forgotten: list[str] = []
    adapters = ReplicaAdapters(forgotten.append)
    config = put(AssetFile.CONFIG, synth.adapter_config(8, 64, TARGETS))
    first, second = put(WEIGHTS, _weights(1)), put(WEIGHTS, _weights(2))

    async def runs(adapter: StoredAdapter, count: int) -> set[AdapterRef]:
        return set(await asyncio.gather(*(adapters.local(adapter) for _ in range(count))))

    local = AdapterRef(finetune_id, str(cache / finetune_id))
    assert asyncio.run(runs(stored(config, first), 4)) == {local}
    assert _cached(cache, finetune_id) == blob_name(WEIGHTS, first[1].sha256) and forgotten == []
    assert asyncio.run(runs(stored(config, second), 2)) == {local}
    assert _cached(cache, finetune_id) == blob_name(WEIGHTS, second[1].sha256)
    assert forgotten == [finetune_id]  # once: the engine loads the new version, not its cached old one
    assert asyncio.run(adapters.local(AdapterRef("plain", "/here"))) == AdapterRef("plain", "/here")
    gone = (WEIGHTS, AssetDigest(3, hashlib.sha256(b"new").hexdigest()))
    with pytest.raises(InvalidFinetune, match="missing from the adapter store"):
        asyncio.run(adapters.local(stored(config, gone)))
    assert [type(item) for item in fetch_failed(InvalidFinetune("gone"), "r", 5)] == [Started, StreamEvent]
    unreachable = AdapterStoreUnavailable("s3://x")
    assert fetch_failed(unreachable, "r", 5) == (Refused("r", unreachable.message),)


def test_the_database_stopped_under_the_gateways_is_a_3040_until_it_returns(shared: Shared,
                                                                           http: httpx.Client) -> None:
    _, finetune_id = _public_finetune(http, shared, "database", seed=5)
    account = shared.server.new_account()
    time.sleep(1.1)  # past the token cache's second: the gateways must ask the database
    shared.database.stop()
    try:
        for inputs in ({}, {"lora": finetune_id}):
            refused = http.post(shared.server.run_url(account), headers=account.headers,
                                json={**RUN, **inputs})
            assert "the registry database is unavailable" in fails(refused, 429, 3040)
        listed = http.get(f"{shared.server.ai_url(account)}/finetunes", headers=account.headers)
        fails(listed, 429, 3040)
    finally:
        shared.database.start()
    # The gateways reconnect by themselves.
    runs = _runs(http, shared, 4, lora=finetune_id)
    assert [run.status_code for run in runs] == [200] * 4, [run.text for run in runs]


def test_an_unreachable_store_refuses_runs_of_adapters_a_replica_lacks(shared: Shared,
                                                                       http: httpx.Client) -> None:
    """Last in the module: moto comes back empty."""
    _, finetune_id = _public_finetune(http, shared, "unreachable", seed=4)
    shared.s3.stop()
    try:
        [refused] = _runs(http, shared, 1, lora=finetune_id)
        assert "the adapter store s3://" in fails(refused, 429, 3040)  # named, as on one server
    finally:
        shared.s3.start()
        shared.s3.create_bucket()

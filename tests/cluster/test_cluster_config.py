"""ClusterConfig: what `serve run` / `serve deploy` hand the application builder (strings from `key=value`
words, mappings from a config file), checked before anything starts; and what `loraserve serve` derives
from it (CPUs for a local Ray, `--gateways` or `--replica-cache-bytes` without `--replicas` refused)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraserve.catalog import ModelSourceError
from loraserve.cli import app
from loraserve.cluster.config import ClusterConfig
from loraserve.cluster.local import local_cpus

from conftest import LORA_MODEL


def test_builder_args_are_coerced_from_the_words_of_serve_run() -> None:
    config = ClusterConfig.from_args({"models": f"{LORA_MODEL}=random:tiny", "replicas": "2",
                                      "engine_num_cpus": "0.5", "data_dir": "/srv/loraserve",
                                      "engine": {"max_num_seqs": 4, "max_queue": 8},
                                      "server": {"rate_limit_per_minute": "0"}})
    assert config.models == (f"{LORA_MODEL}=random:tiny",)
    assert config.replicas == 2 and config.engine_num_cpus == 0.5
    assert config.data_dir == Path("/srv/loraserve")
    assert config.server.rate_limit_per_minute == 0
    assert config.replica_capacity == 12  # what Serve may send one replica: running plus queued
    assert config.engine_config().threads == 1  # half a CPU still runs one thread


def test_an_engine_runs_as_many_threads_as_its_replica_reserves_cpus() -> None:
    assert ClusterConfig(engine_num_cpus=3.5).engine_config().threads == 3
    assert ClusterConfig(engine_num_cpus=3.5, engine={"threads": 1}).engine_config().threads == 1
    # Serve's multiplexing counts as many adapters resident as the engine has device slots, unless told.
    assert ClusterConfig(engine={"max_loras": 5}).adapters_resident == 5
    assert ClusterConfig(engine={"max_loras": 5}, adapters_per_replica=9).adapters_resident == 9


@pytest.mark.parametrize(("args", "message"), [
    ({"replica": 2}, "unknown option(s) replica"),
    ({"server": {"rate_limit": 1}}, "unknown option(s) server.rate_limit"),
    ({"engine": {"max_batch": 4}}, "ClusterConfig.engine: unknown option(s) max_batch"),
    ({"replicas": 0}, "ClusterConfig.replicas must be an integer >= 1"),
    ({"replicas": "two"}, "replicas:"),
    ({"gateways": 0}, "ClusterConfig.gateways must be an integer >= 1"),
    ({"engine_num_cpus": 0}, "ClusterConfig.engine_num_cpus must be > 0"),
    ({"engine": {"max_num_seqs": 0}}, "EngineConfig.max_num_seqs must be >= 1"),
    ({"engine": {"quantize": "q9"}}, "quantize"),
    ({"limits": {"max_rank": 0}}, "RegistryLimits.max_rank must be an integer >= 1"),
    ({"models": []}, "ClusterConfig.models names no model"),
    ({"adapter_store": "ftp://x"}, "must start with"),
    ({"replica_cache_bytes": 0}, "ClusterConfig.replica_cache_bytes must be an integer >= 1, or null"),
    ({"replica_cache_bytes": "lots"}, "replica_cache_bytes:"),
])
def test_bad_builder_args_are_refused_with_what_is_wrong(args: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        ClusterConfig.from_args(args)
    assert message in str(refused.value)


def test_ids_over_the_same_weights_and_template_share_one_engine_deployment() -> None:
    config = ClusterConfig(models=("@cf/test/a=random:tiny", "@cf/test/b=random:tiny",
                                   f"{LORA_MODEL}=random:tiny", "@cf/test/c=random:smollm2-135m"))
    groups = config.engine_groups()
    # The catalog's Llama-2 id renders its own template: the same weights, another deployment.
    assert [(group.model_ids, group.source) for group in groups] == [
        (("@cf/test/a", "@cf/test/b"), "random:tiny"), ((LORA_MODEL,), "random:tiny"),
        (("@cf/test/c",), "random:smollm2-135m")]
    with pytest.raises(ModelSourceError, match="not in the catalog"):
        ClusterConfig(models=("@cf/nobody/unknown",)).engine_groups()


def test_engine_replicas_cache_adapters_under_the_data_dir_unless_told() -> None:
    default = ClusterConfig(data_dir=Path("/srv/loraserve"))
    assert default.replica_cache == Path("/srv/loraserve/replica-cache")
    told = ClusterConfig.from_args({"data_dir": "/srv/loraserve", "replica_cache_dir": "/var/cache/adapters"})
    assert told.replica_cache == Path("/var/cache/adapters")


def test_the_replica_cache_has_a_byte_budget_unless_told_none() -> None:
    assert ClusterConfig().replica_cache_bytes == 32 << 30
    assert ClusterConfig.from_args({"replica_cache_bytes": "1000"}).replica_cache_bytes == 1000
    assert ClusterConfig.from_args({"replica_cache_bytes": None}).replica_cache_bytes is None


def test_a_ray_started_here_reserves_cpus_for_every_gateway() -> None:
    config = ClusterConfig(replicas=2, gateways=3, engine_num_cpus=1, gateway_num_cpus=0.5)
    assert local_cpus(config, engine_deployments=1) == 4  # 2 engines + 1.5 for the gateways, rounded up
    assert ClusterConfig.from_args({"gateways": "2"}).gateways == 2


def test_serve_refuses_cluster_options_without_replicas(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--model",
                                    "@cf/test/tiny=random:tiny", "--gateways", "2"])
    assert done.exit_code == 2, done.output
    assert "--gateways needs --replicas" in " ".join(done.output.split())
    done = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path), "--model",
                                    "@cf/test/tiny=random:tiny", "--replica-cache-bytes", "0"])
    assert done.exit_code == 2, done.output
    assert "--replica-cache-bytes needs --replicas" in " ".join(done.output.split())

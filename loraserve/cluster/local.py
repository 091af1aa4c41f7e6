"""`loraserve serve --replicas N [--gateways M]`: the application on a Ray started here for this machine
(or on the Ray cluster at `--address`), Serve's HTTP proxy on the serve command's host and port, until
Ctrl-C."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import signal
import threading
from types import FrameType
from typing import Any

from loraserve.cli_common import err, fail
from loraserve.cluster.config import ClusterConfig

APP_NAME = "loraserve"
INSTALL_HINT = "--replicas runs on Ray Serve: pip install 'loraserve[cluster]'"


def ray_missing() -> str | None:
    """Why the cluster cannot start here, or None."""
    return None if importlib.util.find_spec("ray") is not None else INSTALL_HINT


def local_cpus(config: ClusterConfig, engine_deployments: int) -> int:
    """Logical CPUs for a Ray started here: what every replica reserves (Serve's controller and proxy
    reserve none)."""
    return math.ceil(engine_deployments * config.replicas * config.engine_num_cpus
                     + config.gateways * config.gateway_num_cpus)


def serve_from_cli(replicas: int | None, address: str | None, engine_process: bool, host: str, port: int,
                   log_level: str, **config: Any) -> None:
    """`loraserve serve --replicas N [--address ADDR]`; `config`: ClusterConfig's fields from the other
    options. What the operator must fix exits with status 2, as `serve` does."""
    if replicas is None:
        raise fail(f"{'--address' if address is not None else '--gateways'} needs --replicas", 2)
    if engine_process:
        raise fail("--engine-process and --replicas do not mix: each engine replica is a process already", 2)
    try:
        serve_cluster(ClusterConfig(replicas=replicas, **config), host, port, address, log_level)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def serve_cluster(config: ClusterConfig, host: str, port: int, address: str | None,
                  log_level: str = "info") -> None:
    """Blocks until Ctrl-C; then deletes the application, and stops the Ray it started. On a Ray started
    here, the engine replicas share this machine's cores evenly. Raises ValueError for what the caller
    must fix (ray not installed, a model that cannot be served)."""
    if (missing := ray_missing()) is not None:
        raise ValueError(missing)
    import ray
    from ray import serve

    from loraserve.cluster.app import build

    groups = config.engine_groups()  # a model argument that cannot be served fails before Ray starts
    # Ray's workers do not start in this directory.
    config = dataclasses.replace(config, data_dir=config.data_dir.resolve(),
                                 replica_cache_dir=config.replica_cache.resolve())
    if address is None:
        share = (os.cpu_count() or 1) / (len(groups) * config.replicas)
        config = dataclasses.replace(config, engine_num_cpus=share)
    app = build(config, groups)
    level = log_level.upper()
    logs = {"log_level": level}  # Serve's controller, proxy and gateway
    if address is None:
        ray.init(num_cpus=local_cpus(config, len(groups)), include_dashboard=False,
                 logging_level=logging.getLevelNamesMapping()[level])
    else:
        ray.init(address=address, logging_level=logging.getLevelNamesMapping()[level])
    signal.signal(signal.SIGTERM, _interrupt)  # stopped as by Ctrl-C: the same clean-up
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=logs)
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logs)
        served = [model_id for group in groups for model_id in group.model_ids]
        err.print(f"serving {', '.join(served)} on http://{host}:{port}, {config.replicas} engine "
                  f"replica(s) each, {config.gateways} gateway(s)", highlight=False)
        threading.Event().wait()  # until KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        if address is None:
            serve.shutdown()  # type: ignore[no-untyped-call]
        else:  # the cluster and its Serve instance are someone else's: take back only this application
            serve.delete(APP_NAME)
        ray.shutdown()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt

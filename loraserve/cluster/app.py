"""The application builder that `serve run`, `serve deploy` (and KubeRay's RayService) name:

    serve run loraserve.cluster.app:build_app replicas=2 models=@cf/test/tiny-lora=random:tiny

or, in a Serve config file, `import_path: loraserve.cluster.app:build_app` with `args:` holding
ClusterConfig's fields (`engine:`, `server:` and `limits:` as mappings of EngineConfig's,
ServerSettings' and RegistryLimits' fields).

One gateway deployment (the HTTP ingress, `gateways` replicas) and one engine deployment per distinct
model (`replicas` each), named `Engine`, `Engine1`, ... (a config file's `deployments:` entries override
their options by name). The engines route by router.py's SessionAffinityRouter, or by Serve's plain
power-of-two when `adapter_affinity` is false.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Deployment

from loraserve.cluster.config import ClusterConfig, EngineGroup
from loraserve.cluster.engine import EngineReplica
from loraserve.cluster.gateway import Gateway
from loraserve.cluster.router import SessionAffinityRouter

# Requests a gateway replica takes beyond what the engines can: those that generate nothing (finetunes,
# models, tokens, health) and those it is refusing.
GATEWAY_HEADROOM = 128


def build_app(args: dict[str, Any]) -> Application:
    return build(ClusterConfig.from_args(args))


def build(config: ClusterConfig, groups: Sequence[EngineGroup] | None = None) -> Application:
    """`groups`: `config.engine_groups()`, when the caller has them already."""
    groups = tuple(config.engine_groups() if groups is None else groups)
    capacity = config.replica_capacity
    engine = config.engine_config()
    engines = [
        _deployment(EngineReplica).options(
            name="Engine" + (str(i) if i else ""),
            num_replicas=config.replicas,
            ray_actor_options={"num_cpus": config.engine_num_cpus},
            # What the engine takes, and no more: Serve then sends a busy adapter's requests to a replica
            # without it rather than queueing them behind a full one.
            max_ongoing_requests=capacity,
            # Requests a gateway holds while every replica is full, before refusing them (3040).
            max_queued_requests=engine.max_queue,
            # The gateway's access log has every request; the gauges polled twice a second would drown it.
            logging_config={"enable_access_log": False},
            request_router_config=_request_router(config),
        ).bind(group.source, engine, config.adapters_resident)
        for i, group in enumerate(groups)
    ]
    gateway = _deployment(Gateway).options(
        num_replicas=config.gateways,
        ray_actor_options={"num_cpus": config.gateway_num_cpus},
        max_ongoing_requests=len(groups) * config.replicas * capacity + GATEWAY_HEADROOM,
    )
    return gateway.bind(config, groups, *engines)


def _request_router(config: ClusterConfig) -> RequestRouterConfig:
    """A session's requests to one replica (router.py), others as Serve routes them; without adapter
    affinity, Serve's plain router for every request: the routing benchmark's baseline keeps no affinity
    of any kind."""
    if not config.adapter_affinity:
        return RequestRouterConfig()
    # Ray annotates the constructor's **kwargs as dicts: the class is what its field takes.
    return RequestRouterConfig(request_router_class=SessionAffinityRouter)  # type: ignore[arg-type]


def _deployment(cls: type[Any]) -> Deployment:
    """`serve.deployment` applied to a class here rather than as its decorator: the module keeps the
    class itself (Ray pickles it by reference), and the options are the application's."""
    made = serve.deployment(cls)
    assert isinstance(made, Deployment)  # its annotation says decorator; given a class, it is this
    return made

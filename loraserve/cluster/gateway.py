"""The gateway deployment: loraserve's FastAPI app (auth, validation, the registry, the Workers AI,
finetunes and OpenAI routes, SSE) as Serve's HTTP ingress, each model a ClusterBackend over its engine
deployment.

With an adapter store, its registry (adapters.GatewayRegistry) hands each run the version of its adapter's
files, which the engine replica fetches itself. Every response names the gateway replica that answered
(`x-loraserve-gateway`, replica_header.py).

Torch-free: the gateway's replicas tokenize and stream; only the engine replicas load torch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from loraserve import catalog
from loraserve.api import create_app
from loraserve.api.ratelimit import RateLimiter
from loraserve.cluster.adapters import GatewayRegistry
from loraserve.cluster.backend import ClusterBackend
from loraserve.cluster.config import ClusterConfig, EngineGroup
from loraserve.cluster.replica_header import ReplicaHeaderMiddleware
from loraserve.registry import Registry
from loraserve.types import Backend

logger = logging.getLogger("loraserve.cluster")


@serve.ingress()
class Gateway:
    """Made a deployment by the application builder (app.py), with its options."""

    def __init__(self, config: ClusterConfig, groups: tuple[EngineGroup, ...], *engines: Any) -> None:
        """`engines[i]` is the DeploymentHandle of the engine deployment serving `groups[i]`."""
        self._config = config
        self._groups = groups
        self._engines = engines
        self._registry: Registry | None = None
        self._clusters: list[ClusterBackend] = []
        self._limiter: RateLimiter | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve builds the app once the replica is constructed, on the replica's event loop."""
        config = self._config
        # Migrated and recovered once by whoever deployed the application (`loraserve serve`); every
        # gateway replica only opens it.
        self._registry = await asyncio.to_thread(GatewayRegistry.for_cluster, config)
        self._clusters = list(await asyncio.gather(*(
            ClusterBackend.connect(handle, group.source, catalog.chat_template(group.template),
                                   config.stats_interval_s, config.adapter_affinity)
            for group, handle in zip(self._groups, self._engines, strict=True))))
        backends: dict[str, Backend] = {}
        for group, backend in zip(self._groups, self._clusters, strict=True):
            backends.update(dict.fromkeys(group.model_ids, backend))
            for model_id in group.model_ids:  # as `serve` warns on one machine (cli_serve.py)
                if (mismatch := catalog.family_mismatch(model_id, backend.info.architecture)) is not None:
                    logger.warning(mismatch)
        app = create_app(self._registry, backends, config.server)
        self._limiter = app.state.loraserve.rate_limiter
        # The outermost layer: it sees every response.
        app.add_middleware(ReplicaHeaderMiddleware, gateway=serve.get_replica_context().replica_id.unique_id)
        return app

    async def __del__(self) -> None:
        # Serve awaits it when the replica stops (its ingress wrapper's __del__ is async too).
        for backend in self._clusters:
            await backend.close()
        if self._limiter is not None:  # its Redis connections, on the loop that opened them
            await self._limiter.aclose()
        if self._registry is not None:
            self._registry.close()

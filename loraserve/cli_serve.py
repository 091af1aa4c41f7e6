"""`loraserve serve`'s work once its options are checked: the registry opened and repaired, each model's
engine loaded (in this process, or in an engine process of its own), the HTTP server run."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraserve import catalog
from loraserve.chat_template import TemplateKind
from loraserve.cli_common import err, fail
from loraserve.types import Backend

if TYPE_CHECKING:
    from loraserve.api import ServerSettings
    from loraserve.engine.config import EngineConfig
    from loraserve.registry import Registry, RegistryLimits
    from loraserve.registry.store import AdapterStoreConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSplit:
    """Each model's engine in a process of its own (engine/core_process/), at `nice` (None: the
    supervisor's default)."""

    nice: int | None = None


def open_registry(
    data_dir: Path, database_url: str | None, limits: RegistryLimits, store: AdapterStoreConfig | None
) -> Registry:
    """Open (and migrate) the registry, then repair what a crash of the last server left behind
    (registry/recovery.py): dead temp uploads, directories of deleted finetunes, files the database
    does not vouch for. A database that fails its integrity check stops the start."""
    from sqlalchemy.exc import DatabaseError

    from loraserve.registry import Registry
    from loraserve.registry.recovery import RegistryCorrupt

    try:
        registry = Registry.open(data_dir, database_url, limits, store)
    except DatabaseError as exc:  # e.g. a SQLite file too damaged to migrate
        raise fail(f"cannot open the registry database: {exc.orig}", 2) from None
    try:
        err.print(registry.recover().summary(), highlight=False)
        if store is not None:
            err.print(f"adapter files in {store.url}, cached in {registry.storage.root}", highlight=False)
    except RegistryCorrupt as exc:
        registry.close()
        raise fail(f"{exc}; restore the database from a backup", 2) from None
    return registry



def serve_models(registry: Registry, sources: list[catalog.ModelSource], located: dict[str, str],
                 engine_config: EngineConfig, split: EngineSplit | None, settings: ServerSettings, host: str,
                 port: int, log_level: str) -> None:
    """Load every model (two ids over the same weights share one engine) and serve them until interrupted."""
    from loraserve.api import create_app
    from loraserve.api import serve as run_server

    load_backend: Callable[..., Backend]
    if split is not None:  # torch is imported by the engine processes only
        from loraserve.engine.core_process.client import EngineClient

        load_backend = (EngineClient if split.nice is None
                        else functools.partial(EngineClient, nice=split.nice))
    else:
        from loraserve.engine.loader import load_backend  # torch: only now
    if engine_config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise fail(
                f"--device {engine_config.device}: torch sees no CUDA device (torch {torch.__version__})", 2
            )

    backends: dict[str, Backend] = {}
    loaded: dict[tuple[str, TemplateKind], Backend] = {}
    for spec in sources:
        key = (located[spec.id], spec.template)
        if key not in loaded:  # two ids over the same weights share one engine
            err.print(f"loading [bold]{spec.id}[/] from {located[spec.id]} ...", highlight=False)
            try:
                loaded[key] = load_backend(located[spec.id], engine_config,
                                           chat_template=catalog.chat_template(spec.template))
            except (OSError, ValueError) as exc:
                raise fail(f"{spec.id}: cannot load {located[spec.id]}: {exc}", 2) from None
            info = loaded[key].info
            hint = " as stored (--dtype float32 dequantizes them)" if info.weights == "gguf" else ""
            err.print(f"loaded {spec.id}: {info.num_layers} layers, {info.weights} weights{hint}",
                      highlight=False)
        backends[spec.id] = loaded[key]
        mismatch = catalog.family_mismatch(spec.id, loaded[key].info.architecture)
        if mismatch is not None:
            log.warning(mismatch)
    if settings.metrics_token is None and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: GET /metrics is open to anyone who reaches {host}:{port}; "
                  "set --metrics-token (or LORASERVE_METRICS_TOKEN) to require a bearer token",
                  highlight=False)
    err.print(f"serving {', '.join(backends)} on http://{host}:{port}", highlight=False)
    run_server(create_app(registry, backends, settings), host, port, log_level=log_level)

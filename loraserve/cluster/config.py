"""What a loraserve Ray Serve application is built from: `serve run` / `serve deploy` pass it as `args`
(config file or `key=value` words), `loraserve serve --replicas N` from its options.

Torch-free and Ray-free: checked on the machine that deploys, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from loraserve import catalog
from loraserve.api.settings import ServerSettings
from loraserve.chat_template import TemplateKind
from loraserve.cli_common import DEFAULT_DATA_DIR
from loraserve.engine.config import EngineConfig
from loraserve.registry.limits import RegistryLimits
from loraserve.registry.store import AdapterStoreConfig


@dataclass(frozen=True)
class EngineGroup:
    """The model ids one engine deployment serves (ids over the same weights and template share one)."""

    model_ids: tuple[str, ...]
    source: str  # located: a path, `embedded` or `random:NAME`
    template: TemplateKind


@dataclass(frozen=True)
class ClusterConfig:
    # `--model` arguments, as `loraserve serve` takes them (ID=SOURCE, or a catalog ID alone).
    models: tuple[str, ...] = (catalog.DEFAULT_MODEL.id,)
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None
    adapter_store: str | None = None
    # With `adapter_store`: the directory each machine's engine replicas fetch adapters into (all of one
    # machine's replicas share it, each fetch under the finetune's flock); None: `data_dir`/replica-cache.
    replica_cache_dir: Path | None = None
    # Bytes of adapters each machine's replica cache keeps; beyond, the least recently used finetunes are
    # removed after a fetch (those used in the last minutes stay: replica_cache.py). None: unbounded.
    # 32 GiB: ~1,000 7B rank-16 q/k/v/o adapters (~34 MB each), 16 times what an engine keeps mapped
    # (adapter_host_cache_bytes, 2 GiB), on a disk that also holds the model's weights.
    replica_cache_bytes: int | None = 32 << 30
    replicas: int = 1  # engine replicas per model
    gateways: int = 1  # gateway replicas (the HTTP ingress); Serve's proxy spreads requests over them
    # Ray's logical CPUs reserved per replica (fractions share a core); an engine runs as many threads as
    # its replica reserves whole CPUs unless `engine` sets `threads`.
    engine_num_cpus: float = 1.0
    gateway_num_cpus: float = 1.0
    # Adapters Serve's multiplexing counts as resident per replica (its LRU); None: the engine's max_loras.
    adapters_per_replica: int | None = None
    # A finetune's requests carry its adapter as Serve's multiplexed model id (sent to a replica holding
    # it). False: every request goes by Serve's plain power-of-two load choice (the routing benchmark's
    # baseline).
    adapter_affinity: bool = True
    # Seconds between two polls of every replica's gauges (admission and /metrics read them).
    stats_interval_s: float = 0.5
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineConfig's fields
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: RegistryLimits = field(default_factory=RegistryLimits)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("ClusterConfig.models names no model to serve")
        for name in ("replicas", "gateways"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClusterConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("engine_num_cpus", "gateway_num_cpus", "stats_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ClusterConfig.{name} must be > 0, got {getattr(self, name)!r}")
        budget = self.replica_cache_bytes
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise ValueError(f"ClusterConfig.replica_cache_bytes must be an integer >= 1, or null "
                             f"for no limit; got {budget!r}")
        if self.adapters_per_replica is not None and self.adapters_per_replica < 1:
            raise ValueError("ClusterConfig.adapters_per_replica must be >= 1 (or unset)")
        self.engine_config()  # raises what EngineConfig refuses, here rather than in every replica
        if self.adapter_store is not None:
            AdapterStoreConfig(self.adapter_store)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ClusterConfig:
        """From an application builder's `args`: values may be strings (`serve run ... replicas=2`);
        `models` may be one model argument. Unknown keys are refused, at any depth."""
        args = dict(args)
        if isinstance(args.get("models"), str):
            args["models"] = [args["models"]]
        _check_keys(cls, args, "")
        try:
            return _CLUSTER.validate_python(args)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None

    def engine_config(self) -> EngineConfig:
        """The engine's config as each replica builds it (`engine`, threads defaulting to the CPUs the
        replica reserves: the driver's core count says nothing of a replica's machine)."""
        if unknown := set(self.engine) - {f.name for f in dataclasses.fields(EngineConfig)}:
            raise ValueError(f"ClusterConfig.engine: unknown option(s) {', '.join(sorted(unknown))}")
        threads = max(1, math.floor(self.engine_num_cpus))
        try:
            return _ENGINE.validate_python({"threads": threads, **self.engine})
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None

    @property
    def adapter_store_config(self) -> AdapterStoreConfig | None:
        return AdapterStoreConfig(self.adapter_store) if self.adapter_store is not None else None

    @property
    def replica_cache(self) -> Path:
        """Where engine replicas keep the adapters they fetch from `adapter_store`."""
        return self.data_dir / "replica-cache" if self.replica_cache_dir is None else self.replica_cache_dir

    @property
    def adapters_resident(self) -> int:
        return self.adapters_per_replica or self.engine_config().max_loras

    @property
    def replica_capacity(self) -> int:
        """Requests one engine takes at once (running and queued): what Serve may send it."""
        engine = self.engine_config()
        return engine.max_num_seqs + engine.max_queue

    def engine_groups(self) -> list[EngineGroup]:
        """One group per distinct (weights, template); raises ModelSourceError (a ValueError) for a model
        argument that cannot be served. May fetch a hub repo id, as `loraserve serve` does."""
        sources = [catalog.parse_model_arg(arg) for arg in self.models]
        groups: dict[tuple[str, TemplateKind], list[str]] = {}
        for spec in sources:
            groups.setdefault((catalog.locate(spec.source), spec.template), []).append(spec.id)
        return [EngineGroup(tuple(ids), source, template) for (source, template), ids in groups.items()]


_CLUSTER = TypeAdapter(ClusterConfig)
_ENGINE = TypeAdapter(EngineConfig)


def _check_keys(cls: type[Any], args: Mapping[str, Any], where: str) -> None:
    """pydantic ignores keys a dataclass lacks: a misspelt option must not vanish silently."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := set(args) - set(fields):
        raise ValueError(f"unknown option(s) {', '.join(sorted(where + k for k in unknown))}; "
                         f"known: {', '.join(where + k for k in fields)}")
    for name, value in args.items():
        kind = _NESTED.get(name)
        if kind is not None and isinstance(value, Mapping):
            _check_keys(kind, value, f"{where}{name}.")


_NESTED: dict[str, type[Any]] = {"server": ServerSettings, "limits": RegistryLimits}


def _describe(exc: ValidationError) -> str:
    """pydantic's errors, one line each: where, and what __post_init__ (or the type) said."""
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'args'}: {error['msg'].removeprefix('Value error, ')}"
        for error in exc.errors()
    )

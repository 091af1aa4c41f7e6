"""Where the registry keeps adapter files: the `AdapterStore` the upload, run and delete paths go through.

`LocalStore`, the default, is the data dir's `finetunes/` (storage.py) exactly as before: the files
there are the adapters, and startup recovery (recovery.py) holds them to the database.
`--adapter-store URL` puts them in a shared store behind fsspec instead (store_remote.py): `s3://` for a
cluster of gateways and engine replicas, `file://` or `memory://` for one machine; the local directory
is then a cache tier each replica fills from the store (store_cache.py).

The store's hooks, in the order the registry calls them for an upload: `stage` (before the record's
transaction: the remote store's PUT), `install` (the last step inside it: the local rename), `retract`
(that commit failed after `install`), `settle` (after the commit). A run calls `materialize` before it
hands the engine local paths; a delete calls `before_delete` inside its transaction and `remove` after it.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loraserve.errors import CapacityExceeded, WorkersAIError
from loraserve.registry.records import AssetFile
from loraserve.registry.recovery import RecoveryReport, recover
from loraserve.registry.storage import AssetDigest, FinetuneStorage, Upload

# What a run's files must be, read from the database only when a store needs it (the local one never does).
Digests = Callable[[], Mapping[AssetFile, AssetDigest]]


class AdapterStoreUnavailable(CapacityExceeded):
    """The store did not answer: 429 / 3040 like any dependency that is down for a while; retry later."""

    def __init__(self, store: str) -> None:
        WorkersAIError.__init__(
            self, f"Capacity temporarily exceeded, please try again: the adapter store {store} is unreachable"
        )


class StoreScheme(enum.Enum):
    S3 = "s3"
    FILE = "file"
    MEMORY = "memory"

    @property
    def package(self) -> str:
        """The fsspec implementation's distribution (the `cluster` extra)."""
        return "s3fs" if self is StoreScheme.S3 else "fsspec"

    def options(self) -> dict[str, Any]:
        """fsspec constructor options. Each store gets its own filesystem object (no instance cache: the
        AWS_* environment is read when it is made) and lists what is there now, never a cached listing."""
        options: dict[str, Any] = {"skip_instance_cache": True}
        if self is StoreScheme.S3:
            # Endpoint and credentials come from the AWS_* environment (botocore reads it); the timeouts
            # and retries bound how long a request waits on a store that is down, so that its client gets
            # the 429 in seconds (botocore's legacy default, 5 attempts with backoff, takes ~10 s).
            botocore: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 60}
            if not {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & os.environ.keys():
                botocore["retries"] = {"mode": "standard", "max_attempts": 3}
            options.update(use_listings_cache=False, config_kwargs=botocore)
        elif self is StoreScheme.FILE:
            options["auto_mkdir"] = True
        return options


@dataclass(frozen=True)
class AdapterStoreConfig:
    """`--adapter-store URL`: `s3://bucket/prefix`, `file:///absolute/path` or `memory://prefix`."""

    url: str

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise ValueError(f"AdapterStoreConfig.url must be a string, got {self.url!r}")
        parts = urlsplit(self.url)
        try:
            scheme = StoreScheme(parts.scheme)
        except ValueError:
            known = ", ".join(f"{s.value}://" for s in StoreScheme)
            raise ValueError(f"--adapter-store {self.url!r}: the URL must start with {known}") from None
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(
                f"--adapter-store {self.url!r}: no query, fragment or credentials in the URL "
                "(S3 credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                "AWS_ENDPOINT_URL, ...)"
            )
        if scheme is StoreScheme.S3 and not parts.netloc:
            raise ValueError(f"--adapter-store {self.url!r}: name the bucket, s3://BUCKET/PREFIX")
        if scheme is StoreScheme.FILE and (parts.netloc not in ("", "localhost") or not parts.path):
            raise ValueError(f"--adapter-store {self.url!r}: use an absolute path, file:///PATH")
        if importlib.util.find_spec(scheme.package) is None:
            raise ValueError(
                f"--adapter-store {self.url!r} needs the {scheme.package} package: "
                "pip install 'loraserve[cluster]'"
            )

    @property
    def scheme(self) -> StoreScheme:
        return StoreScheme(urlsplit(self.url).scheme)


class AdapterStore(Protocol):
    """The hooks the registry calls (see the module docstring for their order)."""

    @property
    def name(self) -> str: ...

    def has(self, finetune_id: str, file: AssetFile) -> bool:
        """Whether a file the database records as accepted may be used."""

    def stage(self, upload: Upload, finetune_id: str, file: AssetFile) -> None: ...

    def install(self, upload: Upload, finetune_id: str, file: AssetFile) -> None: ...

    def retract(self, finetune_id: str, file: AssetFile) -> None: ...

    def settle(self, upload: Upload, finetune_id: str, file: AssetFile) -> None: ...

    def materialize(self, finetune_id: str, files: Collection[AssetFile], digests: Digests) -> None:
        """`files` of the finetune present in the local tier, as the database records them."""

    def before_delete(self, finetune_id: str) -> None: ...

    def remove(self, finetune_id: str) -> None: ...

    def recover(self, engine: Engine, sessions: sessionmaker[Session]) -> RecoveryReport: ...


class LocalStore:
    """The adapters on this machine's disk: the rename is the install (storage.py, recovery.py)."""

    def __init__(self, storage: FinetuneStorage) -> None:
        self.storage = storage

    @property
    def name(self) -> str:
        return str(self.storage.root)

    def has(self, finetune_id: str, file: AssetFile) -> bool:
        # A flag counts only with its file on disk: a lost file must make the finetune not ready.
        return self.storage.has(finetune_id, file)

    def stage(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        pass

    def install(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        # A crash between this rename and the commit leaves a file the database does not vouch for,
        # announced by an intent marker: startup recovery checks it by sha256 and removes it if it differs.
        self.storage.install(upload, finetune_id, file)

    def retract(self, finetune_id: str, file: AssetFile) -> None:
        self.storage.retract(finetune_id, file)

    def settle(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        self.storage.settle(finetune_id, file)

    def materialize(self, finetune_id: str, files: Collection[AssetFile], digests: Digests) -> None:
        pass  # the files are here or the finetune is not ready

    def before_delete(self, finetune_id: str) -> None:
        pass

    def remove(self, finetune_id: str) -> None:
        self.storage.remove(finetune_id)

    def recover(self, engine: Engine, sessions: sessionmaker[Session]) -> RecoveryReport:
        return recover(engine, sessions, self.storage)


def open_store(storage: FinetuneStorage, config: AdapterStoreConfig | None) -> AdapterStore:
    if config is None:
        return LocalStore(storage)
    from loraserve.registry.store_remote import RemoteStore  # fsspec: only with a store configured

    return RemoteStore(storage, config)

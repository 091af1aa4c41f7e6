"""Adapter files in a shared store behind fsspec (`--adapter-store s3://bucket/prefix`), so every gateway
and engine replica sharing the database sees the same finetunes.

Keys are `<prefix>/<finetune_id>/<sha256>/<file name>`: a version is never overwritten by another, and
a reader verifies the sha256 its database record names, so it never sees a mix of old and new. An S3
PUT is atomic per object; a `file://` store writes a temp file and renames it; `memory://` is one
process's dict.

Order of operations, so that a record can never point at a missing object (a leftover object is only
garbage, which costs storage and nothing else):
- upload: validate locally as without a store, PUT, then commit the record (a failed PUT commits
  nothing; a crash or a failed commit after the PUT leaves an unreferenced object);
- re-upload: the new version gets its own key; the old one stays until the finetune is deleted (deleting
  it at once could race another gateway's re-upload of those same bytes, whose record would then point
  at nothing);
- delete: list the finetune's objects (a store that is down refuses the delete before anything is
  committed), commit the record's removal, then remove the objects (if that fails they are garbage).
A store that does not answer is a 429 / 3040 naming it (`AdapterStoreUnavailable`), for uploads, runs
whose adapter is not cached locally, and deletes alike; nothing is retried here beyond botocore's own
few attempts, and the next request after the store returns simply works.

The local directory is a cache tier (store_cache.py): a run whose files are not there, or are an older
version, fetches them (temp file + fsync + rename, sha256 and size checked) before the engine reads them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loraserve.errors import InvalidFinetune, WorkersAIError
from loraserve.registry.records import AssetFile
from loraserve.registry.recovery import RecoveryReport
from loraserve.registry.storage import AssetDigest, FinetuneStorage, Upload, fsync_dir
from loraserve.registry.store import AdapterStoreConfig, AdapterStoreUnavailable, Digests, StoreScheme
from loraserve.registry.store_cache import CacheTier, recover_cache

log = logging.getLogger(__name__)


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a store that is down, slow or refusing raises: OSError and timeouts from fsspec, and the
    errors botocore and aiohttp raise as they are (s3fs translates only S3's own error responses)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as HttpClientError

        errors.append(HttpClientError)
    return tuple(errors)


STORE_ERRORS = _store_errors()


class RemoteStore:
    def __init__(self, storage: FinetuneStorage, config: AdapterStoreConfig) -> None:
        self.storage = storage
        self.config = config
        self.cache = CacheTier(storage)
        self.fs, root = fsspec.url_to_fs(config.url, **config.scheme.options())
        self.root = root.rstrip("/")

    @property
    def name(self) -> str:
        return self.config.url

    def prefix(self, finetune_id: str) -> str:
        """Where the finetune's objects are (its id checked canonical, as for its local directory)."""
        return f"{self.root}/{self.storage.directory(finetune_id).name}"

    def key(self, finetune_id: str, file: AssetFile, sha256: str) -> str:
        return f"{self.prefix(finetune_id)}/{sha256}/{file.value}"

    def has(self, finetune_id: str, file: AssetFile) -> bool:
        return True  # the database marks a file accepted only once it is in the store: its flag says it all

    def stage(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        key = self.key(finetune_id, file, upload.sha256)
        with self.reachable():
            if self.config.scheme is StoreScheme.FILE:
                _put_local(upload.path, Path(key))
            else:
                self.fs.put_file(str(upload.path), key)

    def install(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        pass  # staged before the transaction: nothing left to do inside it

    def retract(self, finetune_id: str, file: AssetFile) -> None:
        pass  # the staged object is unreferenced garbage (see the module docstring)

    def settle(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        try:  # the validated upload becomes this machine's cached copy: no fetch for the next run here
            self.cache.adopt(upload, finetune_id, file)
        except OSError as exc:  # the record is committed; the next run here fetches the file instead
            log.warning("finetune %s: could not cache %s locally: %s", finetune_id, file.value, exc)
            self.storage.discard(upload)

    def materialize(self, finetune_id: str, files: Collection[AssetFile], digests: Digests) -> None:
        if not files:
            return
        recorded = digests()
        for file in files:
            digest = recorded.get(file)
            if digest is None:  # re-validated or deleted since the caller read the record
                raise InvalidFinetune(f"finetune {finetune_id} is missing {file.value}")
            if self.cache.current(finetune_id, file, digest):
                continue
            with self.storage.locked(finetune_id):  # one fetch per file, however many runs wait for it
                if not self.cache.current(finetune_id, file, digest):
                    self.cache.adopt(self._fetch(finetune_id, file, digest), finetune_id, file)

    def _fetch(self, finetune_id: str, file: AssetFile, digest: AssetDigest) -> Upload:
        key = self.key(finetune_id, file, digest.sha256)
        refused = InvalidFinetune(
            f"finetune {finetune_id}: {file.value} in the adapter store {self.name} does not match the "
            "sha256 recorded at its upload; upload it again"
        )
        with self.reachable():
            try:
                source = self.fs.open(key, "rb")
            except FileNotFoundError:
                raise InvalidFinetune(
                    f"finetune {finetune_id}: {file.value} is missing from the adapter store {self.name}; "
                    "upload it again"
                ) from None
        with source:
            reader = io.BufferedReader(_StoreReader(source, self))
            try:
                upload = self.storage.receive(finetune_id, file, reader, digest.size)
            except InvalidFinetune:  # longer than recorded
                raise refused from None
        if (upload.size, upload.sha256) != (digest.size, digest.sha256):
            self.storage.discard(upload)
            raise refused
        return upload

    def before_delete(self, finetune_id: str) -> None:
        with self.reachable():
            self.fs.find(self.prefix(finetune_id))

    def remove(self, finetune_id: str) -> None:
        self.storage.remove(finetune_id)
        try:
            with self.reachable(), contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.prefix(finetune_id), recursive=True)
        except AdapterStoreUnavailable:  # the record is gone: what is left is garbage, not a dangling record
            log.warning("finetune %s deleted; its objects in %s are left behind", finetune_id, self.name)

    def recover(self, engine: Engine, sessions: sessionmaker[Session]) -> RecoveryReport:
        return recover_cache(engine, sessions, self.cache)

    @contextlib.contextmanager
    def reachable(self) -> Iterator[None]:
        """The store's failures as the API's 429 / 3040 naming it (what went wrong goes to the log)."""
        try:
            yield
        except WorkersAIError:
            raise
        except STORE_ERRORS as exc:
            log.warning("adapter store %s: %s: %s", self.name, type(exc).__name__, exc)
            raise AdapterStoreUnavailable(self.name) from exc


class _StoreReader(io.RawIOBase):
    """An object being read from the store, whose failures mid-stream are the store's (not the local
    disk's, which the copy writes to)."""

    def __init__(self, source: BinaryIO, store: RemoteStore) -> None:
        self._source, self._store = source, store

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        with self._store.reachable():
            data = self._source.read(len(view))
        view[: len(data)] = data
        return len(data)


def _put_local(source: Path, dest: Path) -> None:
    """A `file://` store: as durable and atomic as an S3 PUT (temp file, fsync, rename, fsync the dir)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f".partial-{secrets.token_hex(8)}-{dest.name}")
    try:
        with open(source, "rb") as src, open(temp, "wb") as out:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(dest.parent)

"""Adapter files on disk: `{root}/{finetune_id}/adapter_config.json` and `adapter_model.safetensors`.

Uploads land in a temp file in the finetune's own directory (same filesystem, so the final
`os.replace` is atomic) and are fsynced before the rename; a reader sees the old file or the new
one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loraserve.errors import InvalidFinetune
from loraserve.registry.records import AssetFile

CHUNK_BYTES = 1 << 20
_TEMP_PREFIX = ".upload-"


@dataclass(frozen=True)
class Upload:
    """A received file waiting in its temp path for validation."""

    path: Path
    size: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FinetuneStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, finetune_id: str) -> Path:
        # Ids come from our own database, but a path is built from them: insist on the canonical UUID.
        if str(uuid.UUID(finetune_id)) != finetune_id:
            raise ValueError(f"not a canonical finetune id: {finetune_id!r}")
        return self.root / finetune_id

    def path(self, finetune_id: str, file: AssetFile) -> Path:
        return self.directory(finetune_id) / file.value

    def has(self, finetune_id: str, file: AssetFile) -> bool:
        return self.path(finetune_id, file).is_file()

    def receive(self, finetune_id: str, file: AssetFile, source: BinaryIO, max_bytes: int) -> Upload:
        """Stream `source` to a temp file, refusing it past `max_bytes`; the caller validates, then installs."""
        directory = self.directory(finetune_id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_TEMP_PREFIX}{secrets.token_hex(8)}.tmp"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(path, "xb") as out:
                while chunk := source.read(CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidFinetune(f"{file.value}: file exceeds {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Upload(path=path, size=size, sha256=digest.hexdigest())

    def install(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        """Atomically put a validated upload in place, replacing any previous file."""
        os.replace(upload.path, self.path(finetune_id, file))
        _fsync_dir(self.directory(finetune_id))

    @staticmethod
    def discard(upload: Upload) -> None:
        upload.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, finetune_id: str) -> Iterator[None]:
        """Exclusive per-finetune lock across threads and processes: uploads of the two files (and a delete)
        must not interleave, or each could pass its cross-check against the other's old state."""
        directory = self.directory(finetune_id)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)  # flock works on a directory fd; no lock file to leave behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove(self, finetune_id: str) -> None:
        shutil.rmtree(self.directory(finetune_id), ignore_errors=True)

    def remove_if_empty(self, finetune_id: str) -> None:
        with contextlib.suppress(OSError):
            self.directory(finetune_id).rmdir()

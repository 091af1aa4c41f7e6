"""Adapter files on disk: `{root}/{finetune_id}/adapter_config.json` and `adapter_model.safetensors`.

Uploads land in a temp file in the finetune's own directory (same filesystem, so the final
`os.replace` is atomic) and are fsynced before the rename; a reader sees the old file or the new
one, never a half-written one.

Crash safety (see `recovery.py`, which runs at `serve` startup):
- a temp file holds an exclusive `flock` for as long as its upload lives, so startup recovery removes
  only the temp files of dead processes (a kill -9 drops the lock), never a live server's;
- a rename that the database has not vouched for yet is announced by an intent marker
  (`.installing-<file name>`), created and made durable before the rename and removed after the
  commit: a marker found at startup names the one file whose content must be checked against the
  database (by sha256), instead of hashing every adapter on every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loraserve.errors import InvalidFinetune
from loraserve.registry.names import parse_uuid
from loraserve.registry.records import AssetFile

CHUNK_BYTES = 1 << 20
TEMP_PREFIX = ".upload-"
TEMP_SUFFIX = ".tmp"
INTENT_PREFIX = ".installing-"


@dataclass(frozen=True)
class AssetDigest:
    """What the database records of an accepted file: a copy of it must have this size and sha256."""

    size: int
    sha256: str


@dataclass
class Upload:
    """A received file waiting in its temp path for validation.

    `fd` is open on the temp file and holds its flock until `install` or `discard` closes it (-1 then).
    """

    path: Path
    size: int
    sha256: str
    fd: int

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FinetuneStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._held = threading.local()  # the finetune ids whose lock this thread holds

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
        """Stream `source` to a temp file, refusing it past `max_bytes`; the caller validates, then
        installs."""
        directory = self.directory(finetune_id)
        directory.mkdir(parents=True, exist_ok=True)
        path, fd = _locked_temp_file(directory)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(os.dup(fd), "wb") as out:
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
            os.close(fd)
            raise
        return Upload(path=path, size=size, sha256=digest.hexdigest(), fd=fd)

    def intent(self, finetune_id: str, file: AssetFile) -> Path:
        """The marker saying "`file` may have been replaced without the database knowing"."""
        return self.directory(finetune_id) / f"{INTENT_PREFIX}{file.value}"

    def install(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        """Atomically put a validated upload in place, replacing any previous file.

        Leaves the intent marker behind: the caller removes it (`settle`) once the database has
        recorded the new file, or leaves it to startup recovery if the commit never happens.
        """
        directory = self.directory(finetune_id)
        intent = self.intent(finetune_id, file)
        with open(intent, "wb") as marker:
            os.fsync(marker.fileno())
        fsync_dir(directory)  # the marker is durable before the rename can be
        try:
            os.replace(upload.path, self.path(finetune_id, file))
        except BaseException:
            intent.unlink(missing_ok=True)  # nothing was replaced
            raise
        finally:
            upload.close()
        try:
            fsync_dir(directory)
        except BaseException:
            self.retract(finetune_id, file)  # the caller will not commit: take the file back
            raise

    def settle(self, finetune_id: str, file: AssetFile) -> None:
        """The database now vouches for the installed file: drop its intent marker (no fsync needed:
        a marker that survives a crash only costs one sha256 check at the next start)."""
        self.intent(finetune_id, file).unlink(missing_ok=True)

    def retract(self, finetune_id: str, file: AssetFile) -> None:
        """An installed file whose commit failed: remove it, so no file the database does not vouch
        for stays in place (the finetune is then not ready until the file is sent again)."""
        self.path(finetune_id, file).unlink(missing_ok=True)
        fsync_dir(self.directory(finetune_id))
        self.settle(finetune_id, file)

    @staticmethod
    def discard(upload: Upload) -> None:
        upload.path.unlink(missing_ok=True)
        upload.close()

    @contextlib.contextmanager
    def locked(self, finetune_id: str) -> Iterator[None]:
        """Exclusive per-finetune lock across threads and processes: uploads of the two files (and a delete)
        must not interleave, or each could pass its cross-check against the other's old state.

        Reentrant within a thread: an upload holding it may fetch the other file into the local tier, which
        takes it too (a second flock on a new fd of the same process would wait for itself)."""
        held: set[str] = self._held.__dict__.setdefault("ids", set())
        if finetune_id in held:
            yield
            return
        directory = self.directory(finetune_id)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)  # flock works on a directory fd; no lock file to leave behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.add(finetune_id)
            yield
        finally:
            held.discard(finetune_id)
            os.close(fd)

    def remove(self, finetune_id: str) -> None:
        shutil.rmtree(self.directory(finetune_id), ignore_errors=True)

    def remove_if_empty(self, finetune_id: str) -> None:
        with contextlib.suppress(OSError):
            self.directory(finetune_id).rmdir()

    def finetune_ids(self) -> list[str]:
        """The finetune directories on disk (canonical UUID names only; anything else is not ours)."""
        if not self.root.is_dir():
            return []
        return sorted(e.name for e in self.root.iterdir() if e.is_dir() and parse_uuid(e.name) == e.name)

    def remove_dead_temp_files(self, finetune_id: str) -> list[Path]:
        """Remove the temp files no live upload holds (left by a killed process); returns them."""
        removed = []
        for path in sorted(self.directory(finetune_id).glob(f"{TEMP_PREFIX}*")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # its upload just finished
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live upload of another process
                os.close(fd)
                continue
            try:
                # Unlinked while locked: a writer that created it but has not locked it yet sees
                # st_nlink == 0 once it gets the lock, and starts over (see _locked_temp_file).
                path.unlink(missing_ok=True)
                removed.append(path)
            finally:
                os.close(fd)
        return removed


def _locked_temp_file(directory: Path) -> tuple[Path, int]:
    """A new temp file in `directory` and an fd holding its exclusive flock."""
    while True:
        path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return path, fd
        os.close(fd)  # startup recovery of another process took it for dead between create and lock

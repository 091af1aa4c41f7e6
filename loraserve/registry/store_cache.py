"""The local tier of a remote adapter store: `{root}/{finetune_id}/` as a cache the engine reads from.

Each cached copy is a blob named by its content, `.cached-<sha256>-<file name>`, put in place as an
upload is (temp file with its flock, fsync, rename); `<file name>` itself, the path the engine opens, is
a symlink to the blob of the version in use, swapped atomically (a new link renamed over it) once the
blob is durable. So the fixed path always resolves to one complete copy whose sha256 was checked, and
the link's target tells which version it is without hashing 300 MB at every run. A blob the link no
longer names is removed at once (a reader that opened it keeps its inode); nothing here is ever held
against the database: the store and the database are the truth, and a missing or older copy is fetched
again.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loraserve.registry.records import AssetFile
from loraserve.registry.recovery import RecoveryReport, check_database, log_report, sweep
from loraserve.registry.storage import AssetDigest, FinetuneStorage, Upload, fsync_dir

log = logging.getLogger(__name__)

CACHED_PREFIX = ".cached-"
LINK_PREFIX = ".link-"


def blob_name(file: AssetFile, sha256: str) -> str:
    return f"{CACHED_PREFIX}{sha256}-{file.value}"


class CacheTier:
    def __init__(self, storage: FinetuneStorage) -> None:
        self.storage = storage

    def current(self, finetune_id: str, file: AssetFile, digest: AssetDigest) -> bool:
        """Whether the engine's path for `file` holds the copy `digest` describes."""
        link = self.storage.path(finetune_id, file)
        try:
            target = os.readlink(link)
        except OSError:  # absent, or a regular file (a local store's, never trusted as a copy of the store's)
            return False
        return target == blob_name(file, digest.sha256) and link.is_file()

    def adopt(self, upload: Upload, finetune_id: str, file: AssetFile) -> None:
        """Make a verified temp file (an upload or a fetch) the cached copy of `file`."""
        directory = self.storage.directory(finetune_id)
        blob = directory / blob_name(file, upload.sha256)
        try:
            os.replace(upload.path, blob)
        finally:
            upload.close()
        fsync_dir(directory)  # the blob is durable before a link can name it
        link = directory / f"{LINK_PREFIX}{secrets.token_hex(8)}"
        os.symlink(blob.name, link)  # relative: the data dir may move
        try:
            os.replace(link, self.storage.path(finetune_id, file))
        except BaseException:
            link.unlink(missing_ok=True)
            raise
        fsync_dir(directory)
        for old in directory.glob(f"{CACHED_PREFIX}*-{file.value}"):
            if old != blob:
                old.unlink(missing_ok=True)

    def tidy(self, finetune_id: str) -> list[Path]:
        """Remove what a crash left between the steps of `adopt` (a link never renamed into place, a blob
        no link names, a link whose blob is gone); returns the paths removed. Call it under the lock."""
        directory = self.storage.directory(finetune_id)
        removed = list(directory.glob(f"{LINK_PREFIX}*"))
        named = set()
        for file in AssetFile:
            path = self.storage.path(finetune_id, file)
            if path.is_symlink():
                if path.is_file():
                    named.add(os.readlink(path))
                else:
                    removed.append(path)
        removed += [p for p in directory.glob(f"{CACHED_PREFIX}*") if p.name not in named]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed


def recover_cache(engine: Engine, sessions: sessionmaker[Session], cache: CacheTier) -> RecoveryReport:
    """Startup recovery with a remote store: dead temp files and directories of deleted finetunes go as
    with a local store (recovery.py); within the others only the cache's own leftovers are tidied. The
    database is never changed: a copy missing here is fetched when a run needs it."""
    storage = cache.storage
    check_database(engine)
    report = RecoveryReport()
    rows = sweep(sessions, storage, report)
    report.finetunes_checked = len(rows)
    for finetune_id in storage.finetune_ids():
        if finetune_id in rows:
            with storage.locked(finetune_id):
                for path in cache.tidy(finetune_id):
                    log.info("removed %s: a cached copy no link names, or a link without its copy", path)
    log_report(report)
    return report

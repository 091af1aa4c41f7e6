"""Startup recovery: bring the adapter files and the database back in line after a crash (kill -9,
power loss, OOM kill) of a server that was uploading or deleting.

What a crash can leave, and what `recover` does about it:

- a temp upload file (`.upload-*.tmp`) of a killed upload: removed, unless a live process still
  holds its flock (a second server on the same data dir);
- a finetune directory without a database row (killed between a delete's commit and its `rmtree`):
  removed, except when the finetunes table is empty altogether, which smells of a wrong
  `--database-url` rather than of a crash (then they are kept and a warning names them);
- an asset file the database does not vouch for (killed between the rename and the commit of a first
  upload: its flag is false): removed;
- an intent marker (killed between the rename and the commit of a re-upload, or just after the
  commit): the file is hashed and compared with the sha256 the database recorded; a file the
  database does not vouch for is removed and its flag cleared (the finetune is not ready until the
  file is sent again, as the killed client, which got no answer, would expect);
- a vouched file that is missing, has another size than recorded, or whose header does not parse
  (bit rot, a hand-edited data dir): its flag and asset row are cleared and the file removed.

So after `recover`, for every finetune: a flag is true exactly when its asset row exists and its file
is present, has the recorded size and a sane header. Ready finetunes are *not* re-hashed at every
start (that would read every adapter, up to 300 MB each): the size and header checks are cheap, and
only files named by an intent marker are hashed.

Each finetune is checked under its storage lock, the one uploads take, so recovery is safe while
another server process is serving the same data dir. On SQLite, `PRAGMA quick_check` runs first and a
corrupt database stops the start-up.

This is the local store's recovery. With `--adapter-store` the local files are only a cache of the
store, never held against the database: store_cache.recover_cache runs instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, delete, select, text, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from loraserve.registry.finetunes import FLAG_COLUMNS
from loraserve.registry.records import AssetFile
from loraserve.registry.schema import AssetRow, FinetuneRow
from loraserve.registry.storage import CHUNK_BYTES, FinetuneStorage
from loraserve.registry.validate import MAX_CONFIG_BYTES, MAX_HEADER_BYTES

log = logging.getLogger(__name__)


class RegistryCorrupt(RuntimeError):
    """The database failed its integrity check: refuse to serve from it."""


@dataclass
class RecoveryReport:
    finetunes_checked: int = 0
    temp_files_removed: list[Path] = field(default_factory=list)
    orphan_dirs_removed: list[str] = field(default_factory=list)
    orphan_dirs_kept: list[str] = field(default_factory=list)
    unvouched_files_removed: list[Path] = field(default_factory=list)
    intents_resolved: list[Path] = field(default_factory=list)  # markers of installs a crash interrupted
    # (finetune id, file, why): files the database vouched for that failed a check, now cleared.
    files_invalidated: list[tuple[str, AssetFile, str]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.temp_files_removed
            or self.orphan_dirs_removed
            or self.orphan_dirs_kept
            or self.unvouched_files_removed
            or self.intents_resolved
            or self.files_invalidated
        )

    def summary(self) -> str:
        if self.clean:
            return f"registry recovery: {self.finetunes_checked} finetunes checked, nothing to repair"
        parts = [
            f"{len(self.temp_files_removed)} dead temp files removed",
            f"{len(self.orphan_dirs_removed)} orphan directories removed",
            f"{len(self.unvouched_files_removed)} unvouched files removed",
            f"{len(self.intents_resolved)} interrupted installs resolved",
            f"{len(self.files_invalidated)} files invalidated",
        ]
        if self.orphan_dirs_kept:
            parts.append(f"{len(self.orphan_dirs_kept)} orphan directories KEPT (empty finetunes table)")
        return f"registry recovery: {self.finetunes_checked} finetunes checked; " + ", ".join(parts)


def check_database(engine: Engine) -> None:
    """SQLite only: `PRAGMA quick_check` (O(database size); the registry is small)."""
    if engine.dialect.name != "sqlite":
        return
    try:
        with engine.connect() as connection:
            rows = [str(r[0]) for r in connection.execute(text("PRAGMA quick_check"))]
    except DatabaseError as exc:  # "database disk image is malformed" before any row
        rows = [str(exc.orig)]
    if rows != ["ok"]:
        raise RegistryCorrupt(f"the registry database failed PRAGMA quick_check: {'; '.join(rows[:5])}")


def recover(engine: Engine, sessions: sessionmaker[Session], storage: FinetuneStorage) -> RecoveryReport:
    check_database(engine)
    report = RecoveryReport()
    rows = sweep(sessions, storage, report)
    for finetune_id in sorted(rows):
        report.finetunes_checked += 1
        _reconcile(sessions, storage, finetune_id, report)
    log_report(report)
    return report


def sweep(sessions: sessionmaker[Session], storage: FinetuneStorage, report: RecoveryReport) -> set[str]:
    """Remove dead temp files and the directories of deleted finetunes; returns the finetune ids in the
    database."""
    on_disk = storage.finetune_ids()
    for finetune_id in on_disk:
        report.temp_files_removed += storage.remove_dead_temp_files(finetune_id)
    with sessions() as s:
        rows = set(s.scalars(select(FinetuneRow.id)))
    orphans = [i for i in on_disk if i not in rows]
    if orphans and not rows:
        report.orphan_dirs_kept = orphans
        log.warning(
            "%d finetune directories under %s have no database row, and the finetunes table is empty: "
            "is this the right database? They are kept; remove them by hand if they are garbage.",
            len(orphans), storage.root,
        )
    else:
        for finetune_id in orphans:
            storage.remove(finetune_id)
            report.orphan_dirs_removed.append(finetune_id)
    return rows


def log_report(report: RecoveryReport) -> None:
    for path in report.temp_files_removed:
        log.warning("removed the temp file of an upload that never finished: %s", path)
    for finetune_id in report.orphan_dirs_removed:
        log.warning("removed the files of deleted finetune %s", finetune_id)
    for path in report.unvouched_files_removed:
        log.warning("removed %s: its upload was never committed", path)
    for finetune_id, file, why in report.files_invalidated:
        log.warning(
            "finetune %s: %s invalidated (%s); it must be uploaded again", finetune_id, file.value, why
        )


def _reconcile(
    sessions: sessionmaker[Session], storage: FinetuneStorage, finetune_id: str, report: RecoveryReport
) -> None:
    directory = storage.directory(finetune_id)
    with sessions() as s:
        row = s.get(FinetuneRow, finetune_id)
        flagged = row is not None and (row.has_config or row.has_weights)
    if not flagged and not directory.exists():
        return  # nothing accepted, nothing on disk: a fresh finetune
    with storage.locked(finetune_id):  # mkdirs the directory: harmless for a live row
        with sessions() as s:
            row = s.get(FinetuneRow, finetune_id)
            if row is None:
                return  # deleted meanwhile by a live process, which removes the files itself
            flags = {AssetFile.CONFIG: row.has_config, AssetFile.WEIGHTS: row.has_weights}
            assets = {a.file_name: (a.size_bytes, a.sha256) for a in s.scalars(
                select(AssetRow).where(AssetRow.finetune_id == finetune_id)
            )}
        for file in AssetFile:
            path = storage.path(finetune_id, file)
            intent = storage.intent(finetune_id, file)
            in_doubt = intent.exists()
            if not flags[file]:
                if path.exists():
                    path.unlink()
                    report.unvouched_files_removed.append(path)
            else:
                why = _why_invalid(path, file, assets.get(file.value), in_doubt)
                if why is not None:
                    _invalidate(sessions, finetune_id, file)
                    path.unlink(missing_ok=True)  # after the commit: a crash in between leaves it unvouched
                    report.files_invalidated.append((finetune_id, file, why))
            if in_doubt:
                storage.settle(finetune_id, file)
                report.intents_resolved.append(intent)


def _why_invalid(path: Path, file: AssetFile, recorded: tuple[int, str] | None, in_doubt: bool) -> str | None:
    """Why a file the database vouches for cannot be trusted, or None if it can."""
    if recorded is None:
        return "no asset record"
    size, sha256 = recorded
    try:
        actual = path.stat().st_size
        if actual != size:
            return f"file is {actual} bytes, {size} recorded"
        header = _header_problem(path, file, size)
        if header is not None:
            return header
        if in_doubt and _sha256(path) != sha256:
            return "replaced by an upload whose commit never happened"
    except FileNotFoundError:
        return "file missing"
    return None


def _header_problem(path: Path, file: AssetFile, size: int) -> str | None:
    """A cheap sanity check of the file's framing (the full validation ran at upload)."""
    with open(path, "rb") as f:
        if file is AssetFile.CONFIG:
            if size > MAX_CONFIG_BYTES:
                return "config larger than allowed"
            try:
                ok = isinstance(json.loads(f.read()), dict)
            except (ValueError, RecursionError):
                ok = False
            return None if ok else "config is not a JSON object"
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > MAX_HEADER_BYTES or n > size - 8:
            return "safetensors header length is out of bounds"
        try:
            ok = isinstance(json.loads(f.read(n)), dict)
        except (ValueError, RecursionError):
            ok = False
        return None if ok else "safetensors header is not a JSON object"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _invalidate(sessions: sessionmaker[Session], finetune_id: str, file: AssetFile) -> None:
    with sessions.begin() as s:
        s.execute(
            update(FinetuneRow).where(FinetuneRow.id == finetune_id).values({FLAG_COLUMNS[file]: False})
        )
        s.execute(
            delete(AssetRow).where(AssetRow.finetune_id == finetune_id, AssetRow.file_name == file.value)
        )

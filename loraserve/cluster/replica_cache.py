"""A byte budget for the replica cache: the directory where one machine's engine replicas keep the adapters
they fetch from the store (adapters.py), pruned least recently used first after a fetch.

Several replicas (processes) share the directory, and a copy handed to an engine must not vanish before
the engine has opened it. So:
- every `ReplicaAdapters.local` marks the finetune used (`.used`'s mtime, touched under a shared flock
  on that file) *before* it checks that its copy is current;
- the evictor takes, without waiting, the finetune directory's flock (a fetch holds it: `locked()`) and
  then `.used`'s exclusive flock, re-reads the mark, and removes the finetune only if it went unused for
  `grace_s`. A mark made before the eviction took the lock keeps the copy; one made after finds no copy
  and fetches it again. Either way a copy `local()` returns stays at least `grace_s`, the time its
  engine has to open it (the engine memory-maps the files, and Linux keeps a removed inode mapped).
Removal renames the directory aside (`.evicted-*`) in one step, then deletes it: the finetune's path holds
the complete copy or nothing. A lock taken on a path another process renamed away meanwhile is retried
(or skipped) on what the path names now.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from loraserve.registry.names import parse_uuid
from loraserve.registry.storage import FinetuneStorage

log = logging.getLogger(__name__)

MARK = ".used"
EVICTED_PREFIX = ".evicted-"
PRUNE_LOCK = ".pruning"
# How long a copy stays after its last use, whatever the budget: what `local()` returned must still be
# there when the engine opens it, which happens when the request's adapter load comes up (behind the
# engine's queue, up to max_queue requests, and its one loader thread). Seconds on a working replica;
# ten minutes leaves a wide margin, and costs only that adapters used in the last ten minutes may hold
# more than the budget for a while.
GRACE_S = 600.0


@dataclass(frozen=True)
class Cached:
    """One finetune's directory in the cache: its bytes, and when a replica last marked it used."""

    finetune_id: str
    size: int
    used: float  # the mark's mtime; the directory's when it has none yet


class ReplicaCache:
    def __init__(self, storage: FinetuneStorage, grace_s: float = GRACE_S) -> None:
        self.storage = storage
        self.grace_s = grace_s

    def mark(self, finetune_id: str, wait: bool = True) -> bool:
        """Record that this replica is about to read the finetune's copy: call it before checking that
        the copy is current. Without `wait`, returns False (nothing recorded) while an eviction of that
        finetune holds its mark."""
        mark = self.storage.directory(finetune_id) / MARK
        while True:
            try:
                fd = _lock(mark, os.O_RDWR | os.O_CREAT, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                return False
            except FileNotFoundError:  # not cached yet, or evicted since: the fetch will need the directory
                mark.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
        return True

    def scan(self) -> list[Cached]:
        """The cached finetunes, least recently used first."""
        found = []
        try:
            entries = list(os.scandir(self.storage.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and parse_uuid(entry.name) == entry.name:
                try:
                    found.append(_measure(entry))
                except FileNotFoundError:  # evicted meanwhile
                    continue
        return sorted(found, key=lambda cached: cached.used)

    def evict(self, finetune_id: str) -> int | None:
        """Remove the finetune's copy unless it is being fetched or marked now, or was marked within
        `grace_s`; returns the bytes freed, or None if it stays."""
        directory = self.storage.directory(finetune_id)
        try:
            held = _lock(directory, os.O_RDONLY, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fetch holds it
        except (BlockingIOError, FileNotFoundError):
            return None
        try:
            try:
                # Created if missing: a replica may be creating it to mark the finetune this instant. A
                # directory cached before marks existed thus stays one more grace period.
                mark = _lock(directory / MARK, os.O_RDWR | os.O_CREAT, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # being marked
                return None
            try:
                if time.time() - os.fstat(mark).st_mtime < self.grace_s:
                    return None
                size = _measure_dir(directory)[0]
                aside = self.storage.root / f"{EVICTED_PREFIX}{secrets.token_hex(8)}"
                os.rename(directory, aside)
            finally:
                os.close(mark)
        finally:
            os.close(held)
        shutil.rmtree(aside, ignore_errors=True)
        return size

    def prune(self, budget: int) -> list[str]:
        """Evict least recently used finetunes until the cache holds at most `budget` bytes, sparing
        those `evict` spares; returns the ids evicted. One pruning at a time on the machine: two at once
        would each free the whole excess."""
        root = self.storage.root
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / PRUNE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for leftover in root.glob(f"{EVICTED_PREFIX}*"):  # a pruning that died before deleting it
                shutil.rmtree(leftover, ignore_errors=True)
            cached = self.scan()
            total = sum(entry.size for entry in cached)
            evicted = []
            now = time.time()
            for entry in cached:
                if total <= budget or now - entry.used < self.grace_s:  # the rest were used more recently
                    break
                freed = self.evict(entry.finetune_id)
                if freed is not None:
                    total -= freed
                    evicted.append(entry.finetune_id)
            if total > budget:
                log.warning("replica cache %s holds %d bytes, over its budget of %d: the rest is in use "
                            "(used within %.0f s, or being fetched)", root, total, budget, self.grace_s)
            return evicted
        finally:
            os.close(fd)


def _lock(path: Path, flags: int, operation: int) -> int:
    """An fd on `path` holding flock `operation`. Raises FileNotFoundError when `path` is gone, or names
    another file once the lock is held (renamed away by an eviction meanwhile); BlockingIOError when
    LOCK_NB finds it busy."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, operation)
        held, named = os.fstat(fd), os.stat(path)
        if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
            raise FileNotFoundError(f"{path} was replaced")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _measure(entry: os.DirEntry[str]) -> Cached:
    size, marked = _measure_dir(entry.path)
    return Cached(entry.name, size, entry.stat(follow_symlinks=False).st_mtime if marked is None else marked)


def _measure_dir(directory: str | Path) -> tuple[int, float | None]:
    """The bytes of the directory's files (blobs, and temp files of fetches under way; links count
    nothing), and its mark's mtime if it has one."""
    size, marked = 0, None
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                size += stat.st_size
                if entry.name == MARK:
                    marked = stat.st_mtime
    return size, marked

"""The pipe between the API process and the engine process: whole messages, pickled (protocol 5).

A Unix socket pair (`multiprocessing.Pipe`) with no broker, no I/O thread and no dependency: per message it
costs one pickle and one write; `loraserve/tools/channel_bench.py` measures it against ZeroMQ + msgpack.
The receiving end of each side is one thread; sends may come from several (event loops, the reader), so
they are serialized by a lock.
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from multiprocessing.connection import Connection
from typing import Generic, TypeVar, cast

SendT = TypeVar("SendT")
RecvT = TypeVar("RecvT")


class ChannelClosed(Exception):
    """The other process is gone (or this end was closed)."""


class Channel(Generic[SendT, RecvT]):
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: SendT) -> None:
        data = pickle.dumps(message, protocol=5)
        try:
            with self._lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError) as exc:  # a broken pipe, or this end closed
            raise ChannelClosed(str(exc)) from None

    def recv(self) -> RecvT:
        try:
            data = self._conn.recv_bytes()
        except (EOFError, OSError, ValueError) as exc:
            raise ChannelClosed(str(exc) or "end of the pipe") from None
        return cast(RecvT, pickle.loads(data))

    def close(self) -> None:
        self._conn.close()


def pipe() -> tuple[Connection, Connection]:
    """Two connected ends: one stays in this process, the other is handed to the child at spawn."""
    return multiprocessing.Pipe(duplex=True)

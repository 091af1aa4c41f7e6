"""The registry database going away and coming back, seen from the registry's callers.

While the database cannot be reached (connections refused, dropped or timed out, the server shutting down,
SQLite unable to open or lock its file), every registry call raises RegistryUnavailable: 429 / 3040, the
Workers AI answer for a dependency that is down for a while, instead of the bare SQLAlchemy error that the
API could only answer with a 500. It is done here, on the engine, so that every query of every caller
(API routes, auth, the cluster gateway's registry) gets it without a try block of its own.

Nothing else needs doing to recover: the pool's pre-ping (database.py) and SQLAlchemy's invalidation of a
connection that failed give the next call a fresh connection, so calls are served again as soon as the
database answers. A transaction the outage cut was not committed, and the upload path installs its file
as the last step before its commit and takes it back if the commit fails (install.py): an outage leaves
no half-written finetune. Integrity and programming errors are not outages and pass through unchanged.

The two transitions are logged once each (not once per request), naming the database without its
password. Auth tokens that passed within the token cache's TTL (token_cache.py) still pass during an
outage: the calls they make that need the database get the 3040; those that do not (a run without a
finetune) are served.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from loraserve.errors import RegistryUnavailable

log = logging.getLogger(__name__)


def is_outage(context: ExceptionContext) -> bool:
    """Whether the database failed to answer, as opposed to refusing a statement (an integrity error, a
    bug) or the process being interrupted (KeyboardInterrupt also counts as a disconnect for SQLAlchemy)."""
    error = context.sqlalchemy_exception
    if not isinstance(error, DBAPIError):  # not the driver's error: an interrupt, or a bug of ours
        return False
    # OperationalError is DB-API's class for failures "not under the control of the programmer":
    # connection loss, server shutdown, a lock or connect timeout.
    return context.is_disconnect or isinstance(error, OperationalError | InterfaceError)


class OutageWatch:
    """Turns the engine's outage errors into RegistryUnavailable and logs the transitions."""

    def __init__(self, engine: Engine) -> None:
        self.where = engine.url.render_as_string(hide_password=True)
        self.unavailable = False
        self._lock = threading.Lock()  # the registry runs on many worker threads: one log per transition
        event.listen(engine, "handle_error", self._on_error)
        event.listen(engine, "after_cursor_execute", self._on_answer)

    def _on_error(self, context: ExceptionContext) -> None:
        # A failed pre-ping is SQLAlchemy's cue to reconnect at once; raising here would stop it. If the
        # reconnect fails too, that error comes back through here.
        if context.is_pre_ping or not is_outage(context):
            return
        with self._lock:
            first, self.unavailable = not self.unavailable, True
        if first:
            # The driver's own message, on one line: SQLAlchemy's would add the statement and its parameters.
            original = context.original_exception
            log.warning("registry: the database %s is unavailable (%s: %s); registry calls are answered "
                        "429 / 3040 until it answers", self.where, type(original).__name__,
                        " ".join(str(original).split()))
        raise RegistryUnavailable()

    def _on_answer(self, *_args: object) -> None:
        if not self.unavailable:  # the common case, without the lock
            return
        with self._lock:
            was, self.unavailable = self.unavailable, False
        if was:
            log.warning("registry: the database %s answers again", self.where)

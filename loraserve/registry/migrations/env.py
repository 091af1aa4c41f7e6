"""Alembic environment: online only, on the connection `loraserve.registry.database.migrate` passes in.

There is no alembic.ini: the registry migrates itself when it opens, so the database URL and the
connection come from the caller, never from a config file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from loraserve.registry.schema import Base


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("registry migrations run through loraserve.registry.database.migrate only")
    # Batch mode lets later migrations alter tables on SQLite (copy-and-move).
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
_run()

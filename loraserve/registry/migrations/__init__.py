"""Alembic migrations of the registry database, run by `loraserve.registry.database.migrate`."""

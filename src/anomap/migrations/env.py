"""Alembic's environment for the inspection record (:mod:`anomap.record`).

Run by :func:`anomap.record.migrate` with an open connection in
``config.attributes["connection"]``; no alembic.ini is needed."""

from __future__ import annotations

from alembic import context

from anomap.record import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

"""Alembic's environment for the store: run by :func:`qc_daemon.store.migrate` on the connection it passes.

No ``fileConfig``: it would disable the daemon's already configured loggers (sqlalchemy/alembic#714). Batch
mode on SQLite, whose ALTER TABLE cannot change or drop most things in place.
"""

from alembic import context

from qc_daemon.store import Base

if context.is_offline_mode():
    raise RuntimeError("the store's migrations run online only, on the connection qc_daemon.store.migrate passes")

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

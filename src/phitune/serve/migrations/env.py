"""Alembic's entry point, run by `db.migrate` on the connection it holds (no alembic.ini: the
service's --db decides the database). `render_as_batch`: SQLite alters a table by copying it."""

from alembic import context

from phitune.serve.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

"""Alembic environment: runs on the connection `Database.migrate` hands over (in its transaction and lock), never on
a URL of its own, so the server and its migrations always agree on which database they touch.

A new revision: `alembic -c <a config with script_location = this folder> revision -m "..."` against a database at
head, then write its upgrade()/downgrade() by hand (the ORM in serving/db.py is the target to match; the tests
compare the migrated schema with it)."""

from alembic import context

from flythinker.serving.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the server's migrations through flythinker.serving.db.Database.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

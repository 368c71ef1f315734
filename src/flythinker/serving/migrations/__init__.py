"""Alembic migrations of the server's database (run by `flythinker.serving.db.Database.migrate`)."""

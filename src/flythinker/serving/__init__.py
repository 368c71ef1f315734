"""The HTTP service: personalized generation for users whose histories live in a database.

    db.py        storage (SQLAlchemy ORM, alembic migrations in migrations/), DatabaseProfiles (a ProfileStore)
    auth.py      API keys: the admin key, per-user keys, who may touch which user
    engine.py    the generation worker: one thread owns the model; requests join and leave one running batch
                 (continuous batching over decoding/continuous.py) or decode in waves
    service.py   requests -> prompts (inference.Predictor + retrieval) -> the engine; loading from a ServeConfig
    app.py       the FastAPI routes (native API, OpenAI-compatible chat completions, playground at /)
    errors.py    the one JSON error shape and the handlers that enforce it
    config.py    ServeConfig / Limits / ServeModelArgs (the `flythinker serve` settings)

Importing this package loads nothing heavy; `create_app(service)` builds an app without side effects.
"""

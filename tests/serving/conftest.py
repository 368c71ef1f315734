"""Fixtures of the server tests: a tiny FlyThinker whose weights are scaled up so greedy decoding writes varied
text (the default init repeats one token), services over a SQLite file or a real PostgreSQL (skipped, saying why,
when none is reachable), and clients that run the app's lifespan."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

ADMIN_KEY = "test-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Where the PostgreSQL tests connect; each test gets its own schema inside it and drops it afterwards.
PG_ENV = "FLYTHINKER_TEST_POSTGRES_URL"
PG_DEFAULT = "postgresql+psycopg://flythinker_test:flythinker_test@127.0.0.1:5432/flythinker_test"


def scaled_tiny_model(seed: int = 1, scale: float = 0.3):
    from flythinker import FlyThinker
    from flythinker.testing import tiny_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    g, r = tiny_lm("llama", seed=seed), tiny_lm("llama", seed=seed + 1, num_layers=1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for lm in (g, r):
            for p in lm.parameters():
                if p.dim() == 2:
                    p.normal_(0, scale, generator=gen)
    return FlyThinker(g, r, tokenizer=tok).eval(), tok


@pytest.fixture(scope="session")
def tiny():
    return scaled_tiny_model()


@pytest.fixture(scope="session")
def tiny_sft(tiny):
    """The same Generator without a Reasoner: what an SFT checkpoint decodes (one KV cache)."""
    from flythinker import FlyThinker

    model, tok = tiny
    return FlyThinker(model.generator, None, tokenizer=tok).eval(), tok


def data_config(**kw):
    from flythinker.data import DataConfig

    base = {"retrieval": "recency", "k": 2, "profile_tokens": 64, "query_tokens": 32, "min_item_tokens": 16}
    base.update(kw)
    return DataConfig(**base)


def make_service(tiny, url, data=None, decode=None, limits=None, batch_wait_ms=5.0, migrate=True,
                 batching="continuous"):
    from flythinker.decoding import DecodeConfig
    from flythinker.serving.auth import ensure_admin_key
    from flythinker.serving.config import Limits
    from flythinker.serving.db import Database
    from flythinker.serving.service import Service

    model, tok = tiny
    db = Database(url)
    if migrate:
        db.migrate()
    ensure_admin_key(db, ADMIN_KEY)
    return Service(db, model, tok, data or data_config(), decode or DecodeConfig(max_new_tokens=12, batch_size=4),
                   limits or Limits(max_new_tokens=64), name="tiny", batch_wait_ms=batch_wait_ms, batching=batching)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'flythinker.db'}"


_PG_UNREACHABLE: dict[str, str] = {}


def _pg_base_url() -> str:
    return os.environ.get(PG_ENV) or PG_DEFAULT


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose search_path is a fresh schema (dropped after the test)."""
    pytest.importorskip("psycopg", reason="the PostgreSQL tests need psycopg 3")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(_pg_base_url())
    if str(base) in _PG_UNREACHABLE:  # tried once already this session: do not wait for the timeout again
        pytest.skip(_PG_UNREACHABLE[str(base)])
    try:
        admin = create_engine(base, connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # noqa: BLE001 -- any failure to connect means: skip, saying why
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        _PG_UNREACHABLE[str(base)] = (f"no PostgreSQL reachable at {base.render_as_string(hide_password=True)} "
                                      f"(set {PG_ENV}): {first}")
        pytest.skip(_PG_UNREACHABLE[str(base)])
    schema = f"ft_test_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Each storage test runs on a SQLite file and again on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flythinker.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def service(tiny, sqlite_url):
    svc = make_service(tiny, sqlite_url)
    yield svc
    svc.db.close()


@pytest.fixture
def client(service):
    from fastapi.testclient import TestClient

    from flythinker.serving.app import create_app

    with TestClient(create_app(service), raise_server_exceptions=False) as c:
        yield c


def new_user(client, user_id=None):
    """(user_id, headers with that user's key)."""
    r = client.post("/v1/users", json={"user_id": user_id} if user_id else None, headers=ADMIN)
    assert r.status_code == 201, r.text
    body = r.json()
    return body["user_id"], {"Authorization": f"Bearer {body['api_key']}"}


def sse_events(raw: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" kept as the string)."""
    import json

    out = []
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out

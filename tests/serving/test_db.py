"""Storage: CRUD, newest-first order, cascade delete, limits, the migrated schema matching the ORM, the ProfileStore
over the database; every test runs on SQLite and again on a real PostgreSQL (skipped when none is reachable)."""

from __future__ import annotations

import threading

import pytest

from flythinker.data.schema import Example
from flythinker.data.store import ProfileStore
from flythinker.serving.db import (
    Database,
    DatabaseProfiles,
    ItemLimit,
    ItemNotFound,
    UserExists,
    UserNotFound,
    default_url,
    parse_date,
    resolve_url,
)


@pytest.fixture
def db(db_url):
    d = Database(db_url)
    d.migrate()
    yield d
    d.close()


def test_migrate_is_idempotent_and_matches_the_orm(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from flythinker.serving.db import Base

    db.migrate()  # a second start of the server: nothing to do
    assert db.revision() == "0001_initial"
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_user_and_item_crud(db):
    db.create_user("alice", "h" * 64)
    with pytest.raises(UserExists):
        db.create_user("alice", "x" * 64)
    assert db.user_exists("alice") and not db.user_exists("bob")
    assert db.user_for_key_hash("h" * 64) == ("alice", "h" * 64)
    a = db.add_item("alice", "first text", title="T1", date="2021-03-04", meta={"overall": 5, "tags": ["x"]})
    b = db.add_item("alice", "second text")
    items = db.items("alice")
    assert [i["item_id"] for i in items] == [b, a]
    assert items[1] == {"item_id": a, "text": "first text", "title": "T1", "date": "2021-03-04",
                        "meta": {"overall": 5, "tags": ["x"]}, "created": items[1]["created"]}
    db.delete_item("alice", a)
    assert [i["item_id"] for i in db.items("alice")] == [b]
    with pytest.raises(ItemNotFound):
        db.delete_item("alice", a)
    with pytest.raises(UserNotFound):
        db.add_item("nobody", "x")
    with pytest.raises(UserNotFound):
        db.items("nobody")
    assert db.list_users() == [{"user_id": "alice", "created": db.list_users()[0]["created"], "items": 1}]


def test_newest_first_by_date_then_insertion(db):
    db.create_user("u", "k" * 64)
    old = db.add_item("u", "old review", date="1999")
    mid = db.add_item("u", "mid review", date="2010-06-01T10:00:00Z")
    now1 = db.add_item("u", "undated one")       # no date: ordered by when it was written (now)
    now2 = db.add_item("u", "undated two")
    ancient = db.add_item("u", "backfilled later", date=1990)
    assert [i["item_id"] for i in db.items("u")] == [now2, now1, mid, old, ancient]
    assert [p["item_id"] for p in db.profile_items("u")] == [now2, now1, mid, old, ancient]


def test_delete_user_cascades_to_items(db):
    from sqlalchemy import func, select

    from flythinker.serving.db import Item

    for u in ("a", "b"):
        db.create_user(u, u * 64)
        for n in range(3):
            db.add_item(u, f"{u} item {n}")
    db.delete_user("a")
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.user_id == "a")) == 0
        assert s.scalar(select(func.count()).select_from(Item).where(Item.user_id == "b")) == 3
    with pytest.raises(UserNotFound):
        db.delete_user("a")
    db.create_user("a", "n" * 64)  # the id is free again, with no history
    assert db.items("a") == []


def test_item_limit_holds_under_concurrent_inserts(db):
    db.create_user("u", "k" * 64)
    errors, ok = [], []

    def add(n):
        try:
            ok.append(db.add_item("u", f"text {n}", max_items=5))
        except ItemLimit as e:
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 5 and len(errors) == 5
    assert len(db.items("u")) == 5


def test_database_profiles_is_a_profile_store(db):
    db.create_user("u", "k" * 64)
    store = DatabaseProfiles(db)
    assert isinstance(store, ProfileStore)
    ex = Example(id="e", user_id="u", input="q", output="")
    assert store.profile(ex) == []
    i = db.add_item("u", "a text", title="a title", meta={"overall": 4})
    assert store.profile(ex) == [{"overall": 4, "text": "a text", "title": "a title", "item_id": i}]
    assert store.profile(Example(id="e", user_id="ghost", input="q", output="")) == []


def test_unicode_round_trip(db):
    db.create_user("u", "k" * 64)
    text = "Ünïcødé ✓ 漢字 🎵 \"quotes\" \\ back\nslash"
    i = db.add_item("u", text, title="タイトル", meta={"ключ": "значение"})
    got = db.items("u")[0]
    assert (got["item_id"], got["text"], got["title"], got["meta"]) == (i, text, "タイトル", {"ключ": "значение"})


def test_sqlite_pragmas(sqlite_url):
    d = Database(sqlite_url)
    d.migrate()
    with d.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    d.close()


def test_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTHINKER_STATE", str(tmp_path / "state"))
    assert default_url() == f"sqlite:///{tmp_path / 'state' / 'flythinker.db'}"
    assert resolve_url("").database == str(tmp_path / "state" / "flythinker.db")
    assert resolve_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert resolve_url("postgres://u:p@h/db").drivername == "postgresql+psycopg"
    with pytest.raises(ValueError, match="unsupported database"):
        resolve_url("mysql://u:p@h/db")
    with pytest.raises(ValueError, match="not a database URL"):
        resolve_url("not a url")
    d = Database("")  # the default file, its folder created
    d.migrate()
    assert (tmp_path / "state" / "flythinker.db").is_file()
    d.close()


@pytest.mark.parametrize("value,ok", [("2024-05-01", True), ("2024-05-01T12:00:00Z", True), ("1999", True),
                                      (2001, True), ("1700000000", True), ("yesterday", False), ("", False),
                                      ("2024-13-01", False), (True, False)])
def test_parse_date(value, ok):
    if ok:
        assert isinstance(parse_date(value), float)
    else:
        with pytest.raises(ValueError):
            parse_date(value)

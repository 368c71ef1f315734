"""The server's storage: users (with their hashed API keys), their history items, and the server's own keys, in one
SQL database reached through SQLAlchemy 2 (SQLite by default, PostgreSQL for several servers sharing one store).

Owns: the ORM tables, engine set-up from a URL (SQLite in WAL mode with foreign keys on and synchronous=FULL; write
transactions that take SQLite's write lock up front), schema creation by the alembic migrations in
`serving/migrations` (`Database.migrate`, i.e. `upgrade head`), every read and write the HTTP layer makes, and
`DatabaseProfiles`, the `ProfileStore` retrieval reads a user's history through.

Durability rule: a write method returns only after its transaction has committed, so the HTTP layer acknowledges
(201/204) nothing that a crash could lose. Errors a client can cause are `StoreError` subclasses; the HTTP layer maps
them to status codes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..data.schema import Example

STATE_ENV = "FLYTHINKER_STATE"


# ----------------------------------------------------------------------------------------------------------------
# errors a client can cause


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP code the server answers with."""

    status = 400
    kind = "invalid_request_error"


class UserNotFound(StoreError):
    status, kind = 404, "not_found_error"


class ItemNotFound(StoreError):
    status, kind = 404, "not_found_error"


class UserExists(StoreError):
    status, kind = 409, "conflict_error"


class ItemLimit(StoreError):
    status, kind = 409, "limit_error"


# ----------------------------------------------------------------------------------------------------------------
# tables


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Item(Base):
    __tablename__ = "items"
    # sqlite_autoincrement: a deleted item's id is never handed out again (ids are reported as "retrieved").
    __table_args__ = (Index("ix_items_user_newest", "user_id", "sort_time", "item_id"),
                      {"sqlite_autoincrement": True})

    item_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.user_id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text, nullable=True)
    date: Mapped[str | None] = mapped_column(String(64), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # What "newest first" orders by: the item's own date when it has one (a backfilled old review sorts as old),
    # else its creation time, as unix seconds; ties go to the later insert.
    sort_time: Mapped[float] = mapped_column(Float)


class ServerKey(Base):
    """Keys of the server itself (the admin key), hashed like user keys."""

    __tablename__ = "server_keys"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# ----------------------------------------------------------------------------------------------------------------
# URLs and engines


def state_dir() -> Path:
    """$FLYTHINKER_STATE, else ~/.local/state/flythinker."""
    env = os.environ.get(STATE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".local" / "state" / "flythinker"


def default_url() -> str:
    return f"sqlite:///{state_dir() / 'flythinker.db'}"


def resolve_url(url: str | None) -> URL:
    """The URL to connect to: "" / None -> the default SQLite file; postgres:// and postgresql:// use psycopg 3."""
    raw = (url or "").strip() or default_url()
    try:
        u = make_url(raw)
    except Exception as e:  # noqa: BLE001 -- sqlalchemy raises ArgumentError and others for a malformed URL
        raise ValueError(f"--db {raw!r}: not a database URL ({e})") from None
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"--db: unsupported database {u.get_backend_name()!r}; use sqlite:///PATH or "
                         f"postgresql+psycopg://USER:PASS@HOST/DB")
    return u


def _sqlite_engine(u: URL) -> Engine:
    if u.database and u.database != ":memory:":
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Transactions are begun explicitly below (pysqlite's own implicit BEGIN would start writes as readers and
        # hit SQLITE_BUSY on the upgrade instead of waiting for the lock).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")      # readers never block the writer, nor the writer readers
        cur.execute("PRAGMA synchronous=FULL")      # a committed transaction survives power loss, not just a kill
        cur.execute("PRAGMA foreign_keys=ON")       # ON DELETE CASCADE from users to items
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A write takes the write lock at BEGIN, so its reads (the per-user item count) see the state it commits on.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("flythinker_write") else "BEGIN")

    return engine


def make_engine(url: str | URL | None) -> Engine:
    u = url if isinstance(url, URL) else resolve_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u)
    # pre_ping: a server outlives PostgreSQL restarts and idle-connection reaping.
    return create_engine(u, pool_pre_ping=True, connect_args={"connect_timeout": 10})


def parse_date(value: str | int | None) -> float | None:
    """Unix seconds of an item date: an ISO 8601 date or datetime (naive means UTC), a year, or unix seconds.
    None when there is no date; ValueError when there is one that cannot be read."""
    if value is None:
        return None
    if isinstance(value, bool):  # JSON true is not a date; a ValueError like every other unreadable date
        raise ValueError("must be an ISO 8601 date, a year, or unix seconds")  # noqa: TRY004
    if isinstance(value, (int, float)):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return datetime(int(v), 1, 1, tzinfo=timezone.utc).timestamp() if 0 < v < 3000 else v
    s = str(value).strip()
    if re.fullmatch(r"\d{4}", s):
        return datetime(int(s), 1, 1, tzinfo=timezone.utc).timestamp()
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return parse_date(float(s))
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be an ISO 8601 date (2024-05-01, 2024-05-01T12:00:00Z), a year, or unix seconds") \
            from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat()


def item_dict(item: Item) -> dict[str, Any]:
    """An item as the API shows it."""
    return {"item_id": item.item_id, "text": item.text, "title": item.title, "date": item.date,
            "meta": dict(item.meta or {}), "created": _iso(item.created)}


# ----------------------------------------------------------------------------------------------------------------
# the database


class Database:
    """One database: its engine, its migrations, and every operation the server performs on it."""

    def __init__(self, url: str | URL | None = None):
        self.url = url if isinstance(url, URL) else resolve_url(url)
        self.engine = make_engine(self.url)
        self.dialect = self.url.get_backend_name()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def describe(self) -> str:
        """The URL without its password (for logs)."""
        return self.url.render_as_string(hide_password=True)

    # -- transactions -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as s:
            yield s

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits when the block exits (rolls back on an exception)."""
        with self.engine.connect() as conn:
            conn.execution_options(flythinker_write=True)
            with Session(bind=conn, expire_on_commit=False) as s, s.begin():
                yield s

    # -- schema -------------------------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (alembic `upgrade head`), under a lock so that several servers
        starting at once on one database do not race (PostgreSQL: an advisory lock; SQLite: the write lock)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        with self.engine.connect() as conn:
            conn.execution_options(flythinker_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(4640514721)"))  # any fixed number: ours
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")

    def revision(self) -> str | None:
        """The schema revision the database is at (None before `migrate`)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 -- any failure means "not reachable" for /health
            return False

    def close(self) -> None:
        self.engine.dispose()

    # -- server keys --------------------------------------------------------------------------------------------

    def server_key(self, name: str) -> str | None:
        with self.read() as s:
            row = s.get(ServerKey, name)
            return row.key_hash if row else None

    def set_server_key(self, name: str, key_hash: str, replace: bool) -> bool:
        """Store a key's hash; without `replace` only when none is stored. True when this call stored it."""
        try:
            with self.write() as s:
                row = s.get(ServerKey, name)
                if row is not None:
                    if not replace or row.key_hash == key_hash:
                        return False
                    row.key_hash = key_hash
                else:
                    s.add(ServerKey(name=name, key_hash=key_hash, created=utcnow()))
            return True
        except IntegrityError:  # another server stored one first
            return False

    # -- users --------------------------------------------------------------------------------------------------

    def create_user(self, user_id: str, key_hash: str) -> dict[str, Any]:
        try:
            with self.write() as s:
                if s.get(User, user_id) is not None:
                    raise UserExists(f"user {user_id!r} already exists")
                u = User(user_id=user_id, key_hash=key_hash, created=utcnow())
                s.add(u)
        except IntegrityError:  # created by a concurrent request (or another server) in between
            raise UserExists(f"user {user_id!r} already exists") from None
        return {"user_id": user_id, "created": _iso(u.created)}

    def user_exists(self, user_id: str) -> bool:
        with self.read() as s:
            return s.get(User, user_id) is not None

    def user_for_key_hash(self, key_hash: str) -> tuple[str, str] | None:
        """(user_id, stored hash) of the user holding a key with this hash."""
        with self.read() as s:
            row = s.execute(select(User.user_id, User.key_hash).where(User.key_hash == key_hash)).first()
            return (row[0], row[1]) if row else None

    def list_users(self) -> list[dict[str, Any]]:
        with self.read() as s:
            counts = dict(s.execute(select(Item.user_id, func.count()).group_by(Item.user_id)).all())
            users = s.scalars(select(User).order_by(User.created, User.user_id)).all()
            return [{"user_id": u.user_id, "created": _iso(u.created), "items": int(counts.get(u.user_id, 0))}
                    for u in users]

    def delete_user(self, user_id: str) -> None:
        """Remove a user and (ON DELETE CASCADE) every item of theirs, in one transaction."""
        with self.write() as s:
            if s.execute(delete(User).where(User.user_id == user_id)).rowcount == 0:
                raise UserNotFound(f"no user {user_id!r}")

    # -- items --------------------------------------------------------------------------------------------------

    def add_item(self, user_id: str, text_: str, title: str | None = None, date: str | int | None = None,
                 meta: dict[str, Any] | None = None, max_items: int | None = None) -> int:
        """Insert one item; returns its id once committed. UserNotFound, ItemLimit."""
        stamp = parse_date(date)
        now = utcnow()
        try:
            with self.write() as s:
                # Row lock on the user (PostgreSQL) / the write lock (SQLite): concurrent inserts for one user
                # serialize here, so the count below cannot be overtaken.
                if s.execute(select(User.user_id).where(User.user_id == user_id).with_for_update()).first() is None:
                    raise UserNotFound(f"no user {user_id!r}")
                if max_items is not None:
                    n = s.scalar(select(func.count()).select_from(Item).where(Item.user_id == user_id)) or 0
                    if n >= max_items:
                        raise ItemLimit(f"user {user_id!r} has {n} items, the limit; delete some first")
                item = Item(user_id=user_id, text=text_, title=title, date=None if date is None else str(date),
                            meta=dict(meta or {}), created=now,
                            sort_time=stamp if stamp is not None else now.timestamp())
                s.add(item)
                s.flush()
                item_id = int(item.item_id)
        except IntegrityError:  # the user was deleted between the check and the insert (foreign key)
            raise UserNotFound(f"no user {user_id!r}") from None
        return item_id

    def _items_query(self, user_id: str):
        return select(Item).where(Item.user_id == user_id).order_by(Item.sort_time.desc(), Item.item_id.desc())

    def items(self, user_id: str, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """A user's items, newest first (a page of them with limit/offset). UserNotFound when there is no such
        user."""
        with self.read() as s, s.begin():  # one snapshot for the existence check and the items
            if s.get(User, user_id) is None:
                raise UserNotFound(f"no user {user_id!r}")
            q = self._items_query(user_id).offset(offset)
            if limit is not None:
                q = q.limit(limit)
            return [item_dict(it) for it in s.scalars(q).all()]

    def profile_items(self, user_id: str, require_user: bool = False) -> list[dict[str, Any]]:
        """A user's items, newest first, as profile dicts for retrieval and prompts: the item's `meta` keys (e.g. a
        review's "overall" rating) under "text", "title", "date" and "item_id". An unknown user has no items, or
        (require_user) raises UserNotFound."""
        with self.read() as s, s.begin():
            if require_user and s.get(User, user_id) is None:
                raise UserNotFound(f"no user {user_id!r}")
            out = []
            for it in s.scalars(self._items_query(user_id)).all():
                d = dict(it.meta or {})
                d.update({"text": it.text, "item_id": it.item_id})
                if it.title is not None:
                    d["title"] = it.title
                if it.date is not None:
                    d["date"] = it.date
                out.append(d)
            return out

    def delete_item(self, user_id: str, item_id: int) -> None:
        with self.write() as s:
            n = s.execute(delete(Item).where(Item.user_id == user_id, Item.item_id == item_id)).rowcount
            if n == 0:
                if s.get(User, user_id) is None:
                    raise UserNotFound(f"no user {user_id!r}")
                raise ItemNotFound(f"user {user_id!r} has no item {item_id}")


class DatabaseProfiles:
    """The `ProfileStore` over a `Database`: `profile(example)` reads `example.user_id`'s items at call time, newest
    first, each carrying its "item_id", so an item committed before a request is in that request's prompt."""

    def __init__(self, db: Database):
        self.db = db

    def profile(self, example: Example) -> list[dict[str, Any]]:
        return self.db.profile_items(example.user_id)


class FixedProfile:
    """One read of a user's history, for one request: retrieval for the reported ids and for the prompt must see
    the same items even while writes land in between."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def profile(self, example: Example) -> list[dict[str, Any]]:
        return list(self.items)


__all__ = ["Base", "Database", "DatabaseProfiles", "FixedProfile", "Item", "ItemLimit", "ItemNotFound", "ServerKey",
           "StoreError", "User", "UserExists", "UserNotFound", "default_url", "item_dict", "make_engine",
           "parse_date", "resolve_url", "state_dir"]

"""The storage engine every service shares: SQLite (embedded) or PostgreSQL (at scale), and migrations.

Rules for schemas:

- A table belongs to exactly one service and its name starts with that service's prefix:
  `messaging_`, `awareness_` or `sync_`. A service reads and writes only its own tables.
- Tables are SQLModel classes in `services/<service>/store.py`; the schema itself only changes through
  hand-written Alembic revisions in `bimip/migrations/versions/`, and
  `tests/integration/test_storage.py` checks that the two agree.
- Timestamps are `UtcDateTime` columns: timezone-aware in Python on both databases.

SQLite transactions follow the driver's default: a transaction starts at the first write, so reads
before it are not isolated from other connections. Put the write first (or use a single
`UPDATE ... RETURNING` / `INSERT ... ON CONFLICT`) where a read-modify-write must be atomic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import ClauseElement, Table, TextClause, bindparam, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel.ext.asyncio.session import AsyncSession

import bimip.migrations

SQLITE = "sqlite+aiosqlite"
POSTGRESQL = "postgresql+asyncpg"
SUPPORTED_SCHEMES = (SQLITE, POSTGRESQL)

SQLITE_BUSY_TIMEOUT_MS = 5000
POSTGRES_CONNECT_TIMEOUT_S = 10.0

# Alembic's `context` is a process-wide proxy, so two migrations must never run at once in one process.
# (Across processes the database itself serialises them; see migrations/env.py.)
_ALEMBIC_LOCK = threading.Lock()


def create_engine(url: str, *, writer: bool = False) -> AsyncEngine:
    """An async engine for `sqlite+aiosqlite:///path` or `postgresql+asyncpg://...`.

    `writer=True` makes an engine for a service's one writing task: on SQLite its transactions
    start with BEGIN IMMEDIATE, so a transaction that reads before it writes holds the write lock
    from the start and can never fail to upgrade; on PostgreSQL its pool is small.

    Raises ValueError for any other scheme; the message names the scheme, never the whole URL
    (it may hold a password).
    """
    if _supported_scheme(url) == SQLITE:
        return _create_sqlite_engine(url, immediate=writer)
    return create_async_engine(
        url,
        pool_pre_ping=True,
        pool_size=2 if writer else 10,
        max_overflow=2 if writer else 10,
        pool_recycle=1800,
        pool_timeout=10,
        connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_S},
    )


def _supported_scheme(url: str) -> str:
    supported = ", ".join(SUPPORTED_SCHEMES)
    try:
        scheme = make_url(url).drivername
    except ArgumentError:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        raise ValueError(f"malformed database URL (scheme {scheme!r}); supported: {supported}") from None
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported database URL scheme {scheme!r}; supported: {supported}")
    return scheme


def _create_sqlite_engine(url: str, *, immediate: bool = False) -> AsyncEngine:
    database = make_url(url).database or ""
    in_memory = database in ("", ":memory:")
    if not in_memory and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # One shared connection for an in-memory database: each new connection would be a new, empty one.
    # Connections are cheap to keep and dear to open (a thread and the PRAGMAs each): keep enough
    # for the readers of many streams at once rather than closing the overflow after each use.
    engine = (
        create_async_engine(url, poolclass=StaticPool)
        if in_memory
        else create_async_engine(url, pool_size=1 if immediate else 20, max_overflow=1 if immediate else 20)
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()
        if immediate:
            # The driver must not open transactions itself; the "begin" listener does.
            dbapi_connection.isolation_level = None

    if immediate:

        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def dialect_insert(engine: AsyncEngine | AsyncConnection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The INSERT of the engine's dialect, which knows ON CONFLICT (SQLite and PostgreSQL alike)."""
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)


def upsert_statement(
    bind: AsyncEngine | AsyncConnection,
    key: str,
    table: Table,
    columns: Sequence[str],
    on_conflict: Callable[[Any], ClauseElement],
) -> TextClause:
    """`on_conflict(insert)`: an INSERT … ON CONFLICT of `bind`'s dialect, compiled once per
    process and dialect, as text with the same bind types (which SQLAlchemy caches like any
    statement).

    SQLAlchemy never caches the compiled form of a dialect INSERT with ON CONFLICT, so on a hot
    path it would compile it again on every execution, which costs more than running it. `insert`
    is the dialect's INSERT into `table`; the statement is compiled for `columns`, the keys of
    every parameter row. `key` names the statement: use it for one statement only. No RETURNING
    (text cannot return the rows of an executemany).
    """
    dialect = bind.dialect
    found = _UPSERTS.get((dialect.name, key))
    if found is None:
        named = (postgresql.dialect if dialect.name == "postgresql" else sqlite.dialect)(paramstyle="named")
        compiled = on_conflict(dialect_insert(bind, table)).compile(dialect=named, column_keys=list(columns))
        assert isinstance(compiled, SQLCompiler)
        found = _UPSERTS[(dialect.name, key)] = text(compiled.string).bindparams(
            *(bindparam(name, type_=b.type) for name, b in compiled.binds.items())
        )
    return found


_UPSERTS: dict[tuple[str, str], TextClause] = {}


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (no implicit lazy reloads in async code)."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


async def ping(engine: AsyncEngine, seconds: float = 2.0) -> bool:
    """True if the database answers `SELECT 1` within `seconds`; False on any error. Never raises."""
    try:
        async with asyncio.timeout(seconds), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - a health check reports every failure as "not serving"
        return False
    return True


async def schema_revision(engine: AsyncEngine, seconds: float = 2.0) -> str | None:
    """The migration revision the database is at; None if it has none or does not answer."""
    try:
        async with asyncio.timeout(seconds), engine.connect() as conn:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    except Exception:  # noqa: BLE001 - no table yet, or no database: not at any revision
        return None


class UtcDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always returns aware UTC datetimes and refuses naive ones.

    SQLite keeps no offset, so values are normalised to UTC on the way in (which also keeps its
    text comparisons in time order) and marked UTC on the way out.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is UTC:  # the clock's own values: nothing to convert
            return value
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given for a timezone-aware column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# --- migrations -------------------------------------------------------------------------------------


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(bimip.migrations.__file__).parent))
    config.set_main_option("path_separator", "os")
    # Through attributes, not `sqlalchemy.url`: ConfigParser would interpolate a `%` in a password.
    config.attributes["database_url"] = url
    return config


def head_revision() -> str:
    """The newest revision in `bimip/migrations/versions`."""
    head = ScriptDirectory.from_config(_alembic_config("")).get_current_head()
    if head is None:
        raise RuntimeError("no migration revisions found")
    return head


def schema_is_current(revision: str | None) -> bool:
    """Whether a database at `revision` has the schema this code needs: at the head, or at a
    revision this code does not know (a newer release migrated it; migrations only add, so the
    old code keeps working during a rolling upgrade). None or an older revision is not."""
    if revision is None:
        return False
    script = ScriptDirectory.from_config(_alembic_config(""))
    if revision == script.get_current_head():
        return True
    return revision not in {r.revision for r in script.walk_revisions()}


async def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision`; a no-op when it is already there.

    Safe to await from a running event loop, and from several processes at once.
    """
    _supported_scheme(url)
    await asyncio.to_thread(_run_alembic, command.upgrade, url, revision)


async def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at `url` to `revision`; "base" drops every table the migrations made."""
    _supported_scheme(url)
    await asyncio.to_thread(_run_alembic, command.downgrade, url, revision)


async def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at, or None if it was never migrated."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await engine.dispose()


def _run_alembic(alembic_command: Callable[[Config, str], None], url: str, revision: str) -> None:
    # Runs in a worker thread: env.py calls asyncio.run(), which needs a thread without a running loop.
    config = _alembic_config(url)
    with _ALEMBIC_LOCK:
        alembic_command(config, revision)

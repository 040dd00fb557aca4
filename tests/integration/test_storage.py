"""The storage engine and migrations, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel, select

from bimip.core.storage import (
    create_engine,
    current_revision,
    downgrade,
    head_revision,
    migrate,
    ping,
    session_factory,
    upsert_statement,
)
from services.messaging.store import Device
from tests.conftest import Backend

DEVICES = "messaging_devices"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def engine(backend: Backend) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(backend.database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _columns(conn: Connection) -> dict[str, Any]:
    return {column["name"]: column for column in sqlalchemy.inspect(conn).get_columns(DEVICES)}


def _tables(conn: Connection) -> set[str]:
    return set(sqlalchemy.inspect(conn).get_table_names())


async def test_migrate_creates_the_schema(backend: Backend, engine: AsyncEngine) -> None:
    assert await current_revision(backend.database_url) is None

    await migrate(backend.database_url)

    async with engine.connect() as conn:
        columns = await conn.run_sync(_columns)
        indexes = await conn.run_sync(lambda c: sqlalchemy.inspect(c).get_indexes(DEVICES))
        primary_key = await conn.run_sync(lambda c: sqlalchemy.inspect(c).get_pk_constraint(DEVICES))
    assert set(columns) == {"eid", "device_id", "cursor", "first_seen_at", "last_seen_at"}
    assert isinstance(columns["cursor"]["type"], sqlalchemy.BigInteger)
    assert isinstance(columns["eid"]["type"], sqlalchemy.String)
    assert columns["eid"]["type"].length == 256
    assert columns["device_id"]["type"].length == 256
    assert not any(column["nullable"] for column in columns.values())
    assert isinstance(columns["last_seen_at"]["type"], sqlalchemy.DateTime)
    if backend.name == "scale":  # SQLite does not record the time zone flag
        assert columns["first_seen_at"]["type"].timezone is True
        assert columns["last_seen_at"]["type"].timezone is True
    assert primary_key["constrained_columns"] == ["eid", "device_id"]
    assert {"name": "ix_messaging_devices_eid_last_seen_at", "columns": ["eid", "last_seen_at"]} in [
        {"name": index["name"], "columns": index["column_names"]} for index in indexes
    ]
    assert await current_revision(backend.database_url) == head_revision()


async def test_migrating_twice_is_a_no_op(backend: Backend, engine: AsyncEngine) -> None:
    await migrate(backend.database_url)
    async with session_factory(engine)() as session:
        now = datetime.now(UTC)
        session.add(Device(eid="a@x", device_id="d1", first_seen_at=now, last_seen_at=now))
        await session.commit()

    await migrate(backend.database_url)

    assert await current_revision(backend.database_url) == head_revision()
    async with session_factory(engine)() as session:
        assert len((await session.exec(select(Device))).all()) == 1


async def test_migrate_runs_inside_a_running_event_loop(backend: Backend) -> None:
    """Services await migrate() at start-up; the loop keeps running other tasks meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    try:
        await migrate(backend.database_url)
    finally:
        ticker.cancel()
    assert ticks > 1
    assert await current_revision(backend.database_url) == head_revision()


async def test_concurrent_migrations_in_one_process(backend: Backend) -> None:
    await asyncio.gather(*(migrate(backend.database_url) for _ in range(3)))

    assert await current_revision(backend.database_url) == head_revision()


async def test_concurrent_migrations_from_many_processes(backend: Backend) -> None:
    """Replicas starting together all migrate; the database lets one work and the others find it done."""
    code = "import asyncio, sys; from bimip.core.storage import migrate; asyncio.run(migrate(sys.argv[1]))"
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, backend.database_url, cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    errors = [(await process.communicate())[1].decode() for process in processes]

    assert [process.returncode for process in processes] == [0] * len(processes), errors
    assert await current_revision(backend.database_url) == head_revision()


async def test_models_match_migrations(backend: Backend, engine: AsyncEngine) -> None:
    await migrate(backend.database_url)

    def diff(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, SQLModel.metadata))

    async with engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_downgrade_to_base_removes_the_tables(backend: Backend, engine: AsyncEngine) -> None:
    await migrate(backend.database_url)

    await downgrade(backend.database_url, "base")

    async with engine.connect() as conn:
        assert DEVICES not in await conn.run_sync(_tables)
    assert await current_revision(backend.database_url) is None
    await migrate(backend.database_url)  # and back up again
    assert await current_revision(backend.database_url) == head_revision()


async def test_device_round_trip_keeps_timezone_aware_timestamps(
    backend: Backend, engine: AsyncEngine
) -> None:
    await migrate(backend.database_url)
    first = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    last = datetime(2025, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))  # not UTC on purpose
    sessions = session_factory(engine)
    async with sessions() as session:
        session.add(Device(eid="a@x", device_id="d1", cursor=2**40, first_seen_at=first, last_seen_at=last))
        session.add(Device(eid="a@x", device_id="d2", first_seen_at=first, last_seen_at=first))
        await session.commit()

    async with sessions() as session:
        devices = (await session.exec(select(Device).order_by(Device.device_id))).all()
        recent = (await session.exec(select(Device).where(Device.last_seen_at > first))).all()

    assert [(d.device_id, d.cursor) for d in devices] == [("d1", 2**40), ("d2", 0)]
    assert devices[0].first_seen_at == first
    assert devices[0].last_seen_at == last
    assert devices[0].last_seen_at.tzinfo is not None
    assert devices[0].last_seen_at.utcoffset() == timedelta(0)
    assert [d.device_id for d in recent] == ["d1"]


async def test_upsert_statements_are_compiled_once_and_keep_their_bind_types(
    backend: Backend, engine: AsyncEngine
) -> None:
    await migrate(backend.database_url)
    d = Device.__table__
    columns = ("eid", "device_id", "cursor", "first_seen_at", "last_seen_at")

    def newer_cursor(insert: Any) -> Any:
        return insert.on_conflict_do_update(
            index_elements=[d.c.eid, d.c.device_id],
            set_={"cursor": insert.excluded.cursor, "last_seen_at": insert.excluded.last_seen_at},
        )

    first = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    later = datetime(
        2025, 1, 2, 6, 4, 5, tzinfo=timezone(timedelta(hours=2))
    )  # converted to UTC on the way in
    async with engine.begin() as conn:
        statement = upsert_statement(conn, "test: device cursor", d, columns, newer_cursor)
        assert upsert_statement(conn, "test: device cursor", d, columns, newer_cursor) is statement
        row = {"eid": "a@x", "device_id": "d1", "cursor": 1, "first_seen_at": first, "last_seen_at": first}
        await conn.execute(statement, [row, {**row, "device_id": "d2"}])
        await conn.execute(statement, {**row, "cursor": 7, "last_seen_at": later})
        with pytest.raises(sqlalchemy.exc.StatementError, match="naive datetime"):
            await conn.execute(statement, {**row, "last_seen_at": datetime(2025, 1, 1)})
    async with session_factory(engine)() as session:
        devices = (await session.exec(select(Device).order_by(Device.device_id))).all()
    assert [(x.device_id, x.cursor, x.first_seen_at, x.last_seen_at) for x in devices] == [
        ("d1", 7, first, later),
        ("d2", 1, first, first),
    ]


async def test_naive_timestamps_are_refused(backend: Backend, engine: AsyncEngine) -> None:
    await migrate(backend.database_url)
    naive = datetime(2025, 1, 1)
    async with session_factory(engine)() as session:
        session.add(Device(eid="a@x", device_id="d1", first_seen_at=naive, last_seen_at=naive))
        with pytest.raises(sqlalchemy.exc.StatementError, match="naive datetime"):
            await session.commit()


async def test_ping_is_true_on_a_live_database(engine: AsyncEngine) -> None:
    assert await ping(engine) is True


async def test_ping_is_false_quickly_for_an_unreachable_database() -> None:
    engine = create_engine("postgresql+asyncpg://nobody@127.0.0.1:1/nothing")
    started = time.monotonic()
    try:
        assert await ping(engine, seconds=2.0) is False
    finally:
        await engine.dispose()
    assert time.monotonic() - started < 3.0


async def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bimip.db'}"
    await migrate(url)  # migrations turn foreign keys off on their own connection only
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            journal_mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
            foreign_keys = (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar()
            synchronous = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
            busy_timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    finally:
        await engine.dispose()
    assert journal_mode == "wal"
    assert foreign_keys == 1
    assert synchronous == 1  # NORMAL
    assert busy_timeout == 5000


async def test_sqlite_creates_the_database_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "bimip.db"
    url = f"sqlite+aiosqlite:///{path}"

    await migrate(url)

    assert path.exists()
    assert await current_revision(url) == head_revision()


@pytest.mark.parametrize("url", ["mysql://x", "postgresql://u@h/db", "sqlite:///x.db"])
def test_unsupported_schemes_are_refused_by_name(url: str) -> None:
    scheme = url.split("://", 1)[0]
    with pytest.raises(ValueError, match=rf"'{scheme}'.*sqlite\+aiosqlite, postgresql\+asyncpg"):
        create_engine(url)


async def test_migrate_refuses_an_unsupported_scheme() -> None:
    with pytest.raises(ValueError, match="'mysql'"):
        await migrate("mysql://x")


def test_error_for_a_bad_url_does_not_leak_it() -> None:
    with pytest.raises(ValueError) as raised:
        create_engine("mysql://user:s3cret@db/x")
    assert "s3cret" not in str(raised.value)

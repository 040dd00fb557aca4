"""Shared fixtures: real backends, a fresh database and a fresh Redis namespace per test.

Tests that need PostgreSQL or Redis fail (never skip) when those are unreachable, so CI cannot
go green without them. Start them as the README says.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_ADMIN_DSN = os.environ.get("BIMIP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BIMIP_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Backend:
    """Where a test's state lives: the embedded default, or PostgreSQL + Redis."""

    name: str  # "embedded" | "scale"
    database_url: str
    redis_url: str | None  # None = in-process pub/sub and revocations
    namespace: str  # Redis key and channel prefix, unique per test

    def env(self) -> dict[str, str]:
        """The BIMIP_* settings that select this backend."""
        env = {"BIMIP_DATABASE_URL": self.database_url, "BIMIP_REDIS_NAMESPACE": self.namespace}
        if self.redis_url:
            env["BIMIP_REDIS_URL"] = self.redis_url
        return env


async def _create_pg_database() -> tuple[str, Callable[[], Awaitable[None]]]:
    import asyncpg

    name = f"bimip_t_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure means the backend is unusable
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN_DSN} is unreachable ({exc!r}); "
            "start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            pytrace=False,
        )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    return f"{base}/{name}", drop


async def _check_redis() -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await asyncio.wait_for(client.ping(), 5)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            f"Redis at {REDIS_URL} is unreachable ({exc!r}); start it: redis-server --daemonize yes "
            '--bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no',
            pytrace=False,
        )
    finally:
        await client.aclose()


@pytest.fixture(params=["embedded", "scale"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each test that takes `backend` runs on both: SQLite + in-process, PostgreSQL + Redis."""
    namespace = f"bimip-t-{RUN_ID}-{uuid.uuid4().hex[:8]}"
    if request.param == "embedded":
        yield Backend("embedded", f"sqlite+aiosqlite:///{tmp_path / 'bimip.db'}", None, namespace)
        return
    await _check_redis()
    url, drop = await _create_pg_database()
    try:
        yield Backend("scale", url, REDIS_URL, namespace)
    finally:
        await drop()


@pytest.fixture
async def redis_url() -> str:
    await _check_redis()
    return REDIS_URL


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    url, drop = await _create_pg_database()
    try:
        yield url
    finally:
        await drop()

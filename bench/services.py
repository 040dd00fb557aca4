"""The services under benchmark: `bimip run …` processes on free ports, on a fresh backend.

embedded: SQLite in a temporary directory; pub/sub in process (so replicas that must share a
          bus run in one process).
scale:    a new PostgreSQL database (dropped afterwards) and a Redis namespace of its own (its
          keys deleted afterwards), as `make test` expects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import free_port

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123"
INTERNAL_SECRET = "bench-internal-secret-0123456789abcdef"
PG_ADMIN_DSN = os.environ.get("BIMIP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BIMIP_TEST_REDIS", "redis://127.0.0.1:6379/0")
DOMAIN = "bench.example"

BASE_SETTINGS = {
    "BIMIP_JWT_SECRET": JWT_SECRET,
    "BIMIP_INTERNAL_SECRET": INTERNAL_SECRET,
    "BIMIP_SEND_RATE": "100000",
    "BIMIP_SEND_BURST": "100000",
    "BIMIP_LOG_LEVEL": "WARNING",
    "BIMIP_SHUTDOWN_GRACE_S": "1",
    "BIMIP_METRICS_PORT": "0",  # several processes on one machine: any free port each
}
PORT_SETTING = {name: f"BIMIP_{name.upper()}_PORT" for name in ("messaging", "awareness", "sync")}


@dataclass(frozen=True)
class Process:
    """One `bimip run` process: the address of each service it runs."""

    addresses: dict[str, str]
    pid: int


@dataclass(frozen=True)
class Suite:
    processes: list[Process]
    env: dict[str, str]  # the BIMIP_* settings the processes share

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def addresses(self, service: str) -> list[str]:
        """Every replica of `service`, in start order."""
        return [p.addresses[service] for p in self.processes if service in p.addresses]

    def token(self, eid: str, device_id: str) -> str:
        from bimip.core.auth import Keys, issue_client_token
        from bimip.core.config import CoreSettings, load_settings

        keys = Keys.from_settings(load_settings(CoreSettings, self.env))
        return issue_client_token(keys, eid, device_id, timedelta(hours=1))


async def _create_database() -> str:
    import asyncpg  # type: ignore[import-untyped]

    name = f"bimip_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def _drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _drop_namespace(namespace: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _wait_serving(address: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{log.stem} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(grpc.RpcError):
                answer = stub.Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{log.stem} was not SERVING within {timeout:.0f} s")
            time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    problems = [line for line in log.read_text().splitlines() if "ERROR" in line]
    if problems:
        print(f"{log.stem}: {len(problems)} ERROR line(s), first: {problems[0][:2000]}", file=sys.stderr)


@contextlib.contextmanager
def running(
    backend: str, layout: Sequence[Sequence[str]], extra: dict[str, str] | None = None
) -> Iterator[Suite]:
    """Start one `bimip run <services…>` process per element of `layout`, in order, each on free
    ports, all on one fresh backend, with `extra` settings on top of the benchmark's own. Awareness
    and sync use the messaging of their own process, or else the first process that runs it."""
    with tempfile.TemporaryDirectory(prefix="bimip-bench-") as tmp:
        settings = BASE_SETTINGS | {
            "BIMIP_VAR_DIR": tmp,
            "BIMIP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/b.db",
        }
        settings |= extra or {}
        database = namespace = None
        try:
            if backend == "scale":
                database = asyncio.run(_create_database())
                namespace = f"bench-{uuid.uuid4().hex[:8]}"
                base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
                settings |= {
                    "BIMIP_DATABASE_URL": f"{base}/{database}",
                    "BIMIP_REDIS_URL": REDIS_URL,
                    "BIMIP_REDIS_NAMESPACE": namespace,
                    "BIMIP_MIGRATE_ON_START": "true",
                }
            # Nothing inherited may change the services: no other BIMIP_* variable, no trace export.
            inherited = {
                k: v for k, v in os.environ.items() if not k.startswith(("BIMIP_", "OTEL_EXPORTER_OTLP"))
            }
            with contextlib.ExitStack() as stack:
                started: list[Process] = []
                for i, names in enumerate(layout):
                    ports = {name: free_port() for name in names}
                    env = settings | {PORT_SETTING[name]: str(port) for name, port in ports.items()}
                    messaging = [p.addresses["messaging"] for p in started if "messaging" in p.addresses]
                    if "messaging" in ports:
                        messaging.insert(0, f"127.0.0.1:{ports['messaging']}")
                    if messaging:
                        env["BIMIP_MESSAGING_ADDRESS"] = messaging[0]
                    log = Path(tmp) / f"{'+'.join(names)}-{i}.log"
                    with log.open("wb") as out:
                        process = subprocess.Popen(
                            [str(Path(sys.executable).parent / "bimip"), "run", *names],
                            env=inherited | env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    stack.callback(_stop, process, log)
                    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
                    _wait_serving(next(iter(addresses.values())), process, log)
                    started.append(Process(addresses, process.pid))
                yield Suite(started, settings)
        finally:
            if database is not None:
                asyncio.run(_drop_database(database))
            if namespace is not None:
                asyncio.run(_drop_namespace(namespace))

"""`bimip` as a person runs it: real processes, real ports, Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bimip.core.auth import Keys, verify_token
from bimip.core.config import CoreSettings, load_settings
from tests.helpers import eventually

BIMIP = [sys.executable, "-m", "bimip.cli"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIMIP_")}
    env.update(
        {
            "BIMIP_VAR_DIR": str(tmp_path / "var"),
            "BIMIP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/var/b.db",
            "BIMIP_METRICS_PORT": "0",  # any free port: 9464 may be taken on this machine
        }
    )
    env.update(extra)
    return env


async def _serving(port: int) -> bool:
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
            return response.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


async def test_run_starts_all_three_and_ctrl_c_stops_gracefully(tmp_path: Path) -> None:
    ports = _free_ports(3)
    env = _env(
        tmp_path,
        BIMIP_MESSAGING_PORT=str(ports[0]),
        BIMIP_AWARENESS_PORT=str(ports[1]),
        BIMIP_SYNC_PORT=str(ports[2]),
    )
    proc = subprocess.Popen(
        [*BIMIP, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for port in ports:
            await eventually(lambda p=port: _serving(p), timeout=30)  # type: ignore[misc]
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "messaging  listening on 127.0.0.1:" in out
    assert "shutting down" in out
    assert (tmp_path / "var" / "b.db").exists()  # the embedded database, migrated at start-up


async def test_run_one_service_alone(tmp_path: Path) -> None:
    (port,) = _free_ports(1)
    env = _env(tmp_path, BIMIP_AWARENESS_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.awareness"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        await eventually(lambda: _serving(port), timeout=30)
        assert "awareness  listening" in (proc.stdout.readline() if proc.stdout else "")
        # The container health check: exit 0 when SERVING, 1 otherwise (here: nothing listens).
        health = [*BIMIP, "health", "--service", "bimip.awareness.v1.AwarenessService"]
        ok = await asyncio.to_thread(
            subprocess.run, [*health, f"--address=127.0.0.1:{port}"], capture_output=True, text=True, env=env
        )
        assert (ok.returncode, ok.stdout.strip()) == (0, f"127.0.0.1:{port}: SERVING")
        (closed,) = _free_ports(1)
        down = await asyncio.to_thread(
            subprocess.run,
            [*health, f"--address=127.0.0.1:{closed}"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0


def test_bad_setting_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    for variable, value in [
        ("BIMIP_MESSAGING_PORT", "eighty"),
        ("BIMIP_DATABASE_URL", "mysql://db"),
        ("BIMIP_SYNCPORT", "1"),
    ]:
        result = subprocess.run(
            [*BIMIP, "run"],
            env=_env(tmp_path, **{variable: value}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert f"configuration error: {variable}:" in result.stderr


def test_token_issue_prints_a_token_the_services_accept(tmp_path: Path) -> None:
    env = _env(tmp_path)
    result = subprocess.run(
        [*BIMIP, "token", "issue", "--user", "alice@example.com", "--device", "laptop"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = result.stdout.strip()
    # Same VAR_DIR, same development secret as a `bimip run` there would use.
    keys = Keys.from_settings(load_settings(CoreSettings, env))
    principal = verify_token(keys, token, internal=False)
    assert (principal.eid, principal.device_id) == ("alice@example.com", "laptop")
    bad = subprocess.run(
        [*BIMIP, "token", "issue", "--user", "alice", "--device", "laptop"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--user" in bad.stderr

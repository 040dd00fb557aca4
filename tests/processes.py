"""Run a BIMIP service as a real process (`bimip run <name>`) on a free port, as a deployment does.

For the tests that need more than the in-process suite: replicas in separate processes, and a
process that is SIGKILLed and started again. Output goes to a log file (never an unread pipe), and
every failure to start says what the process printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bimip.core.auth import Keys, issue_client_token
from bimip.core.config import CoreSettings, load_settings
from tests.helpers import eventually

BIMIP = Path(sys.prefix) / "bin" / "bimip"  # the venv's console script


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def token(env: Mapping[str, str], eid: str, device: str, ttl_s: float = 3600) -> str:
    """A client token the processes started with `env` accept (same secrets)."""
    keys = Keys.from_settings(load_settings(CoreSettings, dict(env)))
    return issue_client_token(keys, eid, device, timedelta(seconds=ttl_s))


class ProcessExited(RuntimeError):
    """The process ended while we waited for it (not an AssertionError: `eventually` stops at once)."""


class ServiceProcess:
    """One `bimip run <name>` process; start, wait for health SERVING, kill, start again."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, *, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.startswith(("BIMIP_", "OTEL_"))}
        # Metrics on any free port unless `env` names one: processes on one machine must not collide.
        self.env = {
            **base,
            "BIMIP_METRICS_PORT": "0",
            **env,
            f"BIMIP_{name.upper()}_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(BIMIP), "run", self.name],
                env=self.env,
                cwd=self.log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    async def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ProcessExited(
                f"{self.name} on port {self.port} exited with {self.proc.returncode}:\n{self.output()}"
            )
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                response = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(), timeout=1
                )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def wait_serving(self, timeout: float = 30.0) -> None:
        try:
            await eventually(self._serving, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(
                f"{self.name} on port {self.port} not SERVING within {timeout}s:\n{self.output()}"
            ) from None

    async def kill(self) -> int:
        """SIGKILL: no shutdown, no flush; returns once the process is gone."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        return await asyncio.to_thread(self.proc.wait)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful), SIGKILL if it does not end in time. Safe to call twice."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def ensure_dead(self) -> None:
        """Last resort for a `finally`: never leave a process behind."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@contextlib.asynccontextmanager
async def running_processes(processes: Sequence[ServiceProcess]) -> AsyncIterator[Sequence[ServiceProcess]]:
    """Start every process at once, wait until all are SERVING; stop them all at the end."""
    try:
        for process in processes:
            process.start()
        await asyncio.gather(*(p.wait_serving() for p in processes))
        yield processes
    finally:
        try:
            await asyncio.gather(*(p.stop() for p in processes), return_exceptions=True)
        finally:
            for process in processes:
                process.ensure_dead()


def tcp_local_ports(pid: int, remote_port: int) -> set[int]:
    """The local ports of `pid`'s TCP connections to `remote_port` (from /proc, Linux only)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports

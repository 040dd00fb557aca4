"""What the benchmarks share: the workload, the client processes, the timeline, percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import platform
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any, Generic, Protocol, TypeVar

A = TypeVar("A")
R = TypeVar("R")

# One TCP connection per stream, as phones and laptops have: without a local subchannel pool, the
# channels of a process to one address would share one connection.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.use_local_subchannel_pool", 1),)

DRAIN_S = 5.0
"""After the measurement window, how long messages sent inside it may still take to complete."""

Ready = Callable[[], Awaitable[float]]
"""A client process calls this once its streams are open; it returns the agreed start (wall clock)."""


@dataclass(frozen=True)
class Workload:
    """The issue's reference workload: 50 users in pairs, 8 messages of 100 bytes in flight each."""

    users: int = 50
    inflight: int = 8
    size: int = 100
    warmup: float = 3.0
    duration: float = 20.0
    processes: int = 2

    def __post_init__(self) -> None:
        if self.users < 2 or self.users % 2:
            raise ValueError("--users must be an even number of at least 2 (users talk in pairs)")
        if self.inflight < 1 or self.size < 8 or self.duration <= 0 or self.warmup < 0:
            raise ValueError("--inflight >= 1, --size >= 8, --duration > 0 and --warmup >= 0")
        if not 1 <= self.processes <= self.users // 2:
            raise ValueError("--processes must be between 1 and the number of pairs")

    def pairs_of(self, process: int) -> list[int]:
        """The pairs (0 .. users/2 - 1) a client process drives: both users of a pair together."""
        return [pair for pair in range(self.users // 2) if pair % self.processes == process]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Window(Protocol):
    """A run's warm-up and measured duration, in seconds."""

    @property
    def warmup(self) -> float: ...

    @property
    def duration(self) -> float: ...


@dataclass(frozen=True)
class Timeline:
    """One run's clock in a client process (monotonic): send from `start`, measure in
    [`measure_from`, `measure_to`), stop sending at `measure_to`."""

    start: float
    measure_from: float
    measure_to: float

    @classmethod
    def of(cls, start_at: float, workload: Window) -> Timeline:
        start = time.monotonic() + (start_at - time.time())
        return cls(start, start + workload.warmup, start + workload.warmup + workload.duration)

    def measuring(self, t: float) -> bool:
        return self.measure_from <= t < self.measure_to

    @property
    def duration(self) -> float:
        return self.measure_to - self.measure_from


async def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def poll_until(condition: Callable[[], bool], within: float, interval: float = 0.01) -> bool:
    """Wait until `condition()` holds, for state that another process writes (shared memory), which
    no event in this process announces. False if `within` seconds passed first."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (q in 0..100)."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[rank - 1]


def latency_ms(samples: list[float], prefix: str) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        f"{prefix}_p50_ms": round(percentile(ordered, 50) * 1000, 2),
        f"{prefix}_p99_ms": round(percentile(ordered, 99) * 1000, 2),
        f"{prefix}_samples": len(ordered),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "grpcio": metadata.version("grpcio"),
        "command": " ".join(argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- client processes ---------------------------------------------------------------------------


ClientMain = Callable[[A, Ready], Coroutine[Any, Any, R]]
"""What runs in a client process: `async def main(args, ready) -> result` (picklable, top level)."""


def _dump_tasks() -> None:
    """Print where every task of this process waits (SIGUSR1: the parent gave up waiting on it)."""
    print(f"--- client process {os.getpid()}: its tasks", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


def _child(conn: Connection, fn: ClientMain[A, R], args: A) -> None:
    async def ready() -> float:
        conn.send(("ready", None))
        return float(await asyncio.to_thread(conn.recv))

    async def main() -> R:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
        return await fn(args, ready)

    try:
        result: R = asyncio.run(main())
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("result", result))


def _expect(conn: Connection, kind: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"a client process sent no {kind!r} within {timeout:.0f} s")
    got, value = conn.recv()
    if got == "error":
        raise RuntimeError(f"a client process failed:\n{value}")
    if got != kind:
        raise RuntimeError(f"a client process sent {got!r}, expected {kind!r}")
    return value


ServerProcess = tuple[multiprocessing.process.BaseProcess, Connection]


def spawn_server(
    target: Callable[..., None], *args: Any, what: str = "a server"
) -> tuple[ServerProcess, int]:
    """Start `target(conn, *args)` in a spawned process, which must send its port on `conn` and
    stop when it receives anything; returns the process with the parent's end, and the port."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    if not parent.poll(60):
        stop_server((process, parent))
        raise TimeoutError(f"{what} did not start within 60 s")
    return (process, parent), int(parent.recv())


def stop_server(server: ServerProcess) -> None:
    """Tell a server of `spawn_server` to stop; terminate it if it has not within 10 s."""
    process, parent = server
    with contextlib.suppress(OSError):
        parent.send("stop")
    process.join(10)
    if process.is_alive():
        process.terminate()
        process.join(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ClientsRun(Generic[R]):
    results: list[R]
    server_cpu: float  # cores the server processes used during the window (1.0 = one core busy)
    clients_cpu: float  # cores the client processes used together during the window


Started = list[tuple[multiprocessing.process.BaseProcess, Connection]]


@contextlib.contextmanager
def spawned_clients(fn: ClientMain[A, R], per_process: Sequence[A]) -> Iterator[Started]:
    """One spawned process per element of `per_process`, running `fn(args, ready)` (see `_child`),
    with the parent's end of its pipe; on exit each is joined, and terminated if it hangs."""
    ctx = multiprocessing.get_context("spawn")
    started: Started = []
    try:
        for args in per_process:
            parent, child = ctx.Pipe()
            spawned = ctx.Process(target=_child, args=(child, fn, args), daemon=True)
            spawned.start()
            started.append((spawned, parent))
        yield started
    finally:
        for process, conn in started:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
            conn.close()


def run_clients(
    fn: ClientMain[A, R],
    per_process: Sequence[A],
    *,
    warmup: float,
    duration: float,
    server_pids: Sequence[int],
) -> ClientsRun[R]:
    """Run `fn(args, ready)` in one spawned process per element of `per_process`; start them all at
    the same moment once every one is ready; return their results in order, with the CPU the server
    processes (together) and the clients used during the measurement window [start + warmup,
    start + warmup + duration)."""
    with spawned_clients(fn, per_process) as started:
        for _, conn in started:
            _expect(conn, "ready", 120)
        start_at = time.time() + 0.5
        for _, conn in started:
            conn.send(start_at)
        servers = len(server_pids)
        pids = [*server_pids, *(process.pid for process, _ in started if process.pid is not None)]
        time.sleep(max(0.0, start_at + warmup - time.time()))
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(duration)
        used = [(cpu_seconds(pid) - b) / duration for pid, b in zip(pids, before, strict=True)]
        limit = DRAIN_S + 60
        try:
            results = [_expect(conn, "result", limit) for _, conn in started]
        except TimeoutError:
            for process, _ in started:  # say where the stuck ones wait before giving up
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signal.SIGUSR1)
            time.sleep(2)
            raise
        return ClientsRun(results, round(sum(used[:servers]), 2), round(sum(used[servers:]), 2))

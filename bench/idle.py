"""Idle streams: how many idle device streams one messaging process holds, and their memory each.

    python -m bench.idle [--backend embedded|scale|both] [--streams 10000] [--processes 2]
                         [--connections 200] [--hold 5] [--parallel 100] [--output PATH]

The target (the product's benchmark issue): one messaging process holds at least 10,000 idle device
streams at no more than 30 KB each.

One `bimip run messaging` process on a fresh backend (embedded: SQLite; scale: PostgreSQL + Redis).
After a warm-up (a few streams opened and closed, so that first-use allocations - compiled SQL,
gRPC arenas - are not charged to the streams), the server's resident memory (VmRSS) is read. Then
`--streams` users each open one device stream (Connect: `open`, answered by `opened`) from
`--processes` client processes, at most `--parallel` opens in flight per process; tokens are signed
in the client processes. The streams then stay idle: the server does not need heartbeats from the
client (it ignores them; it sends its own every `heartbeat_interval_ms`, which the clients read).
After `--hold` seconds the server's RSS and the CPU it used during the hold are read; every stream
is then checked with a probe (an ack of offset 0, which the server answers with a cursor frame and
writes nothing for), and all are closed (half-close; the server ends them). KB per stream is the
RSS growth over the streams held; "2nd half" is the growth from when half of them were open, which
leaves out fixed costs (but RSS also keeps what the allocator does not give back).

The streams are MULTIPLEXED: they share `--connections` HTTP/2 connections in total (about
streams / connections streams on each). A real deployment has one connection per phone, so this
measures the server's per-stream cost (handler, tasks, queues, gRPC call state, subscriptions), not
the per-connection cost (socket, kernel buffers, HTTP/2 transport state) that 10,000 separate
connections would add on top. It also keeps the file descriptors of both sides low.

Prints a progress line per step and a table; writes bench/results/idle.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    CHANNEL_OPTIONS,
    Ready,
    Timeline,
    _expect,
    cpu_seconds,
    latency_ms,
    machine_info,
    sleep_until,
    spawned_clients,
)
from bench.services import DOMAIN, running
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc

RESULTS = Path(__file__).parent / "results" / "idle.json"
TARGET_STREAMS = 10_000
TARGET_KB_PER_STREAM = 30.0
DEVICE = "phone"
OPEN_TIMEOUT_S = 60.0  # one open: `open` written until `opened` read
PROBE_TIMEOUT_S = 20.0  # every probe of a process answered within this
CLOSE_TIMEOUT_S = 20.0  # every stream of a process ended by the server within this after half-close
PROBE_SEQ = 1
PROBE_AFTER_S = 0.5  # after the hold ends, so that the RSS read at its end sees idle streams only
WARMUP_STREAMS = 20
SETTLE_S = 1.0  # before an RSS reading the parent takes: let the server finish what it was doing


# --- the server process, from /proc -------------------------------------------------------------


def status_kb(pid: int, name: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, RssAnon, …)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {name}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    """The process's soft / hard limit on open files, from /proc/<pid>/limits."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft} / {hard}"
    return "?"


def raise_nofile() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


@dataclass(frozen=True)
class Sample:
    """The server at one moment: resident memory and CPU time used so far."""

    rss_kb: int
    hwm_kb: int
    anon_kb: int
    cpu_s: float
    fds: int
    at: float  # monotonic

    @classmethod
    def of(cls, pid: int) -> Sample:
        return cls(
            status_kb(pid, "VmRSS"),
            status_kb(pid, "VmHWM"),
            status_kb(pid, "RssAnon"),
            cpu_seconds(pid),
            open_files(pid),
            time.monotonic(),
        )


# --- one client process -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """The hold as a `Window` (bench.common.Timeline): no warm-up, `duration` seconds."""

    warmup: float
    duration: float


@dataclass(frozen=True)
class ClientArgs:
    index: int
    address: str
    env: dict[str, str]  # the servers' BIMIP_* settings: the token signing key
    eids: tuple[str, ...]  # one device (DEVICE) each
    connections: int  # channels (HTTP/2 connections) of this process
    parallel: int  # opens in flight at once
    hold_s: float
    opened: Any  # shared int[processes]: streams each client process has opened so far


@dataclass
class ClientResult:
    requested: int = 0
    opened: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # by status code (or TIMEOUT, …)
    failure_details: dict[str, str] = field(default_factory=dict)  # the first detail of each code
    open_latencies: list[float] = field(default_factory=list)  # `open` written -> `opened` read
    open_started: float = 0.0  # monotonic (one clock for all processes of the machine)
    open_ended: float = 0.0
    open_at_hold_end: int = 0  # streams the server had not ended when the hold ended
    probed: int = 0  # streams that answered the probe after the hold
    lost: Counter[str] = field(default_factory=Counter)  # streams the server ended, by status code
    counts: Counter[str] = field(default_factory=Counter)  # frames received after `opened`
    closed_by_server: int = 0  # streams the server ended (OK) after the half-close, in time
    nofile: int = 0  # this process's soft limit on open files


class IdleStream:
    """One open device stream: a reader for the server's frames (heartbeats, the probe's answer)."""

    def __init__(self, call: Any, result: ClientResult) -> None:
        self.call = call
        self.result = result
        self.ended: str | None = None  # how the server ended the stream: a status code name
        self.answered = asyncio.Event()
        self.closing = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        counts = self.result.counts
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                kind = frame.WhichOneof("frame")
                if kind == "cursor" and frame.seq == PROBE_SEQ:
                    self.answered.set()
                elif kind == "error":
                    counts[f"error frame: {frame.error.reason}"] += 1
                else:
                    counts[f"{kind} frames"] += 1
            self.ended = "OK"
        except grpc.aio.AioRpcError as err:
            self.ended = err.code().name
        if not self.closing:
            self.result.lost[self.ended] += 1

    async def probe(self) -> bool:
        """An ack of offset 0: the server answers it with a cursor frame and writes nothing."""
        if self.ended is not None:
            return False
        ack = messaging_pb2.AckRequest(offset=0)
        try:
            await self.call.write(messaging_pb2.ConnectRequest(seq=PROBE_SEQ, ack=ack))
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await self.answered.wait()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        """Half-close; the server ends the stream (its reader then sees the end)."""
        self.closing = True
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.done_writing()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(self.reader)
            if self.ended == "OK":
                self.result.closed_by_server += 1


def _failed(result: ClientResult, code: str, detail: str) -> None:
    result.failed[code] += 1
    result.failure_details.setdefault(code, detail[:300])


async def _open(stub: Any, token: str, result: ClientResult) -> IdleStream | None:
    call: Any = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
    started = time.monotonic()
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            await call.write(messaging_pb2.ConnectRequest(seq=0, open=messaging_pb2.OpenRequest()))
            first: Any = await call.read()
    except TimeoutError:
        call.cancel()
        _failed(result, "TIMEOUT", f"no `opened` within {OPEN_TIMEOUT_S:g} s")
        return None
    except grpc.aio.AioRpcError as err:
        _failed(result, err.code().name, err.details() or "")
        return None
    except asyncio.InvalidStateError:  # the call ended before the write: its status says why
        code = await call.code()
        _failed(result, code.name, await call.details() or "")
        return None
    if first is grpc.aio.EOF:
        code = await call.code()
        _failed(result, code.name, f"ended before `opened`: {await call.details()}")
        return None
    if first.WhichOneof("frame") != "opened":
        call.cancel()
        _failed(result, "NOT_OPENED", f"first frame: {first.WhichOneof('frame')}")
        return None
    result.open_latencies.append(time.monotonic() - started)
    return IdleStream(call, result)


async def open_streams(
    address: str,
    tokens: Sequence[str],
    connections: int,
    parallel: int,
    result: ClientResult,
    on_open: Callable[[], None] | None = None,
) -> tuple[list[grpc.aio.Channel], list[IdleStream]]:
    """Open one stream per token, over `connections` channels (stream i on channel i mod n), at
    most `parallel` opens in flight."""
    channels = [
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        for _ in range(max(1, min(connections, len(tokens))))
    ]
    stubs: list[Any] = [messaging_pb2_grpc.MessagingServiceStub(channel) for channel in channels]
    gate = asyncio.Semaphore(parallel)

    async def one(i: int, token: str) -> IdleStream | None:
        async with gate:
            stream = await _open(stubs[i % len(stubs)], token, result)
        if stream is not None and on_open is not None:
            on_open()
        return stream

    opened = await asyncio.gather(*(one(i, token) for i, token in enumerate(tokens)))
    return channels, [stream for stream in opened if stream is not None]


def _tokens(env: dict[str, str], eids: Sequence[str]) -> list[str]:
    """Client tokens signed here with the servers' key: ~0.07 ms each, where `Suite.token` takes
    ~1.4 ms (it loads the settings for every token)."""
    from bimip.core.auth import Keys, issue_client_token
    from bimip.core.config import CoreSettings, load_settings

    keys = Keys.from_settings(load_settings(CoreSettings, env))
    return [issue_client_token(keys, eid, DEVICE, timedelta(hours=1)) for eid in eids]


async def idle_client(args: ClientArgs, ready: Ready) -> ClientResult:
    """One client process: open its streams, report ready, hold them idle until the hold ends
    (the parent measures the server meanwhile), check and probe them, close them."""
    result = ClientResult(requested=len(args.eids), nofile=raise_nofile())
    tokens = _tokens(args.env, args.eids)

    def count() -> None:
        args.opened[args.index] += 1

    result.open_started = time.monotonic()
    channels, streams = await open_streams(
        args.address, tokens, args.connections, args.parallel, result, count
    )
    result.open_ended = time.monotonic()
    result.opened = len(streams)
    print(
        f"  client {args.index}: {result.opened:,}/{result.requested:,} streams open in "
        f"{result.open_ended - result.open_started:.1f} s over {len(channels)} connections"
        + (f", failed: {dict(result.failed)}" if result.failed else ""),
        flush=True,
    )
    try:
        timeline = Timeline.of(await ready(), Hold(0.0, args.hold_s))
        await sleep_until(timeline.measure_to + PROBE_AFTER_S)
        result.open_at_hold_end = sum(1 for s in streams if s.ended is None)
        answers = await asyncio.gather(*(s.probe() for s in streams))
        result.probed = sum(answers)
        return result
    finally:
        await asyncio.gather(*(s.close() for s in streams))
        await asyncio.gather(*(channel.close() for channel in channels))
        for stream in streams:
            stream.reader.cancel()
        await asyncio.gather(*(s.reader for s in streams), return_exceptions=True)


# --- the run ------------------------------------------------------------------------------------


async def _warm_up(address: str, env: dict[str, str], n: int) -> None:
    """Open and close `n` streams of throw-away users, so that first-use allocations come before
    the `before` reading."""
    result = ClientResult()
    tokens = _tokens(env, [f"warm{i}@{DOMAIN}" for i in range(n)])
    channels, streams = await open_streams(address, tokens, 1, n, result)
    await asyncio.gather(*(s.close() for s in streams))
    await asyncio.gather(*(channel.close() for channel in channels))
    if result.failed:
        raise RuntimeError(f"warm-up streams failed to open: {dict(result.failed)} {result.failure_details}")


def _split(n: int, parts: int) -> list[range]:
    """0 .. n-1 in `parts` consecutive ranges, as equal as can be."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(range(start, end))
        start = end
    return out


@dataclass
class Phases:
    """The parent's readings of the server, and the client processes' results."""

    open_half: tuple[Sample, int] | None  # the server when about half the streams were open
    hold_start: Sample
    hold_end: Sample
    clients_cpu_s: float  # the client processes together, during the hold
    results: list[ClientResult]


def _drive(per_process: Sequence[ClientArgs], server_pid: int, hold_s: float, label: str) -> Phases:
    """Run `idle_client` in one spawned process per element of `per_process` (bench.common's
    `Ready` protocol); read the server at half the opens and at the start and end of the hold.
    Unlike `run_clients`, the opening phase may take as long as the opens need (up to 1 s per 20
    streams), not 120 s: on a 2-CPU machine the server opens ~90 streams/s on embedded and only
    35-75/s on scale, so 10,000 streams take minutes."""
    opened = per_process[0].opened
    total = sum(len(args.eids) for args in per_process)
    with spawned_clients(idle_client, per_process) as started:
        t0 = time.monotonic()
        deadline = t0 + max(120.0, total / 20)
        half: tuple[Sample, int] | None = None
        waiting = list(range(len(started)))
        next_report = t0 + 10
        while waiting:
            now = time.monotonic()
            if half is None and sum(opened) >= total // 2:
                half = Sample.of(server_pid), sum(opened)
            if now >= next_report:
                print(f"{label} {sum(opened):,}/{total:,} open after {now - t0:.0f} s", flush=True)
                next_report += 10
            for p in list(waiting):
                if started[p][1].poll():
                    _expect(started[p][1], "ready", 0)
                    waiting.remove(p)
            if now > deadline:
                raise TimeoutError(f"the clients did not open their streams within {deadline - t0:.0f} s")
            time.sleep(0.05)
        start_at = time.time() + 0.5
        for _, conn in started:
            conn.send(start_at)
        time.sleep(max(0.0, start_at - time.time()))
        clients = [process.pid for process, _ in started if process.pid is not None]
        hold_start = Sample.of(server_pid)
        clients_before = sum(cpu_seconds(pid) for pid in clients)
        time.sleep(hold_s)
        hold_end = Sample.of(server_pid)
        clients_cpu = sum(cpu_seconds(pid) for pid in clients) - clients_before
        limit = PROBE_AFTER_S + PROBE_TIMEOUT_S + CLOSE_TIMEOUT_S + 60
        results = [_expect(conn, "result", limit) for _, conn in started]
        return Phases(half, hold_start, hold_end, clients_cpu, results)


def run_idle(
    backend: str,
    streams: int,
    *,
    processes: int = 2,
    connections: int = 200,
    hold_s: float = 5.0,
    parallel: int = 100,
) -> dict[str, Any]:
    """One messaging process on `backend` ("embedded": SQLite; "scale": PostgreSQL + Redis);
    `streams` users open one device stream each from `processes` client processes, at most
    `parallel` opens in flight per process. The streams are MULTIPLEXED over `connections` HTTP/2
    connections in total; a real deployment has one connection per phone, so this measures the
    server's per-stream cost, not the per-connection socket and kernel cost on top. The streams are
    held idle `hold_s` seconds. Returns the server's memory before and after, per stream, the time to
    open them all, and the CPU the server used while they were idle."""
    if streams < 1 or processes < 1 or connections < processes or hold_s <= 0 or parallel < 1:
        raise ValueError("streams >= 1, processes >= 1, connections >= processes, hold > 0, parallel >= 1")
    processes = min(processes, streams)
    label = f"[idle {backend}]"
    raise_nofile()  # the server inherits this process's limits (bench.services starts it with Popen)
    with running(backend, [["messaging"]]) as suite:
        pid = suite.pids[0]
        address = suite.addresses("messaging")[0]
        start = Sample.of(pid)
        server_nofile = nofile_limit(pid)
        print(
            f"{label} messaging up (pid {pid}, open files limit {server_nofile}), "
            f"RSS {start.rss_kb / 1024:.1f} MB",
            flush=True,
        )
        asyncio.run(_warm_up(address, suite.env, WARMUP_STREAMS))
        time.sleep(SETTLE_S)
        before = Sample.of(pid)
        print(
            f"{label} warm-up ({WARMUP_STREAMS} streams opened and closed) done, RSS before "
            f"{before.rss_kb / 1024:.1f} MB; opening {streams:,} streams over {connections} connections "
            f"from {processes} processes, {parallel} opens in flight each",
            flush=True,
        )
        opened = multiprocessing.get_context("spawn").RawArray("q", processes)
        channel_shares = [len(r) for r in _split(connections, processes)]
        per_process = [
            ClientArgs(
                p,
                address,
                suite.env,
                tuple(f"idle{i}@{DOMAIN}" for i in users),
                channel_shares[p],
                parallel,
                hold_s,
                opened,
            )
            for p, users in enumerate(_split(streams, processes))
        ]
        phases = _drive(per_process, pid, hold_s, label)
        print(
            f"{label} held {hold_s:g} s: RSS {phases.hold_end.rss_kb / 1024:.1f} MB, server CPU "
            f"{phases.hold_end.cpu_s - phases.hold_start.cpu_s:.2f} s; checked and closed",
            flush=True,
        )
        time.sleep(SETTLE_S)
        after_close = Sample.of(pid)
    results, hold_start, hold_end = phases.results, phases.hold_start, phases.hold_end
    failed: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    details: dict[str, str] = {}
    for r in results:
        failed.update(r.failed)
        lost.update(r.lost)
        counts.update(r.counts)
        for code, detail in r.failure_details.items():
            details.setdefault(code, detail)
    total_opened = sum(r.opened for r in results)
    at_hold_end = sum(r.open_at_hold_end for r in results)
    probed = sum(r.probed for r in results)
    open_s = max(r.open_ended for r in results) - min(r.open_started for r in results)
    per_stream = (hold_end.rss_kb - before.rss_kb) / at_hold_end if at_hold_end else math.nan
    marginal = math.nan
    if phases.open_half is not None and total_opened > phases.open_half[1]:
        half, n_half = phases.open_half
        marginal = (hold_end.rss_kb - half.rss_kb) / (total_opened - n_half)
    hold = hold_end.at - hold_start.at
    idle_cpu = hold_end.cpu_s - hold_start.cpu_s
    return {
        "streams_requested": streams,
        "streams_opened": total_opened,
        "streams_open": probed,  # opened, still open when the hold ended, and answered the probe
        "streams_open_at_hold_end": at_hold_end,
        "failed": dict(sorted(failed.items())),
        "failure_details": details,
        "lost_before_close": dict(sorted(lost.items())),
        "rss_start_mb": round(start.rss_kb / 1024, 1),
        "rss_before_mb": round(before.rss_kb / 1024, 1),
        "rss_half_mb": round(phases.open_half[0].rss_kb / 1024, 1) if phases.open_half else None,
        "rss_after_mb": round(hold_end.rss_kb / 1024, 1),
        "rss_anon_before_mb": round(before.anon_kb / 1024, 1),
        "rss_anon_after_mb": round(hold_end.anon_kb / 1024, 1),
        "rss_peak_mb": round(hold_end.hwm_kb / 1024, 1),
        "rss_after_close_mb": round(after_close.rss_kb / 1024, 1),
        "kb_per_stream": _finite(per_stream),
        "kb_per_stream_second_half": _finite(marginal),  # None: the opens came in too few steps
        "open_s": round(open_s, 2),
        "opens_per_s": round(total_opened / open_s, 1) if open_s > 0 else None,
        **latency_ms(sorted(x for r in results for x in r.open_latencies), "open"),
        "server_cpu_s_opening": round(hold_start.cpu_s - before.cpu_s, 2),
        "server_cpu_s_while_idle": round(idle_cpu, 3),
        "server_cpu_ms_per_stream_per_s_idle": round(idle_cpu / hold / at_hold_end * 1000, 4)
        if at_hold_end
        else None,
        "hold_s": round(hold, 2),
        "clients_cpu_s_while_idle": round(phases.clients_cpu_s, 3),
        "server_open_files": hold_end.fds,
        "server_nofile_limit": server_nofile,
        "client_nofile_soft": min(r.nofile for r in results),
        "closed_by_server": sum(r.closed_by_server for r in results),
        "frames_after_open": dict(sorted(counts.items())),
        "connections": connections,
        "streams_per_connection": round(streams / connections, 1),
        "processes": processes,
        "parallel_opens_per_process": parallel,
        "target": {"streams": TARGET_STREAMS, "kb_per_stream": TARGET_KB_PER_STREAM},
        "meets_target": probed >= TARGET_STREAMS and per_stream <= TARGET_KB_PER_STREAM,
    }


def _finite(x: float) -> float | None:
    """`x` rounded for the report, None when unknown (JSON has no NaN)."""
    return round(x, 2) if math.isfinite(x) else None


def _kb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | streams open / requested | failed | RSS before → after MB | KB / stream "
        "| KB / stream, 2nd half | open s | opens/s | server CPU s while idle (hold s) "
        "| connections | processes |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in scenarios.items():
        failed = ", ".join(f"{code} {n}" for code, n in m["failed"].items()) or "0"
        lines.append(
            f"| {name} | {m['streams_open']:,} / {m['streams_requested']:,} | {failed} "
            f"| {m['rss_before_mb']:.1f} → {m['rss_after_mb']:.1f} | {_kb(m['kb_per_stream'])} "
            f"| {_kb(m['kb_per_stream_second_half'])} | {m['open_s']:.1f} | {m['opens_per_s'] or 0:,.0f} "
            f"| {m['server_cpu_s_while_idle']:.2f} ({m['hold_s']:.1f}) "
            f"| {m['connections']} | {m['processes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=("embedded", "scale", "both"),
        default="embedded",
        help="embedded: SQLite, in-process pub/sub; scale: PostgreSQL + Redis",
    )
    parser.add_argument("--streams", type=int, default=TARGET_STREAMS, help="device streams to open")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=200, help="HTTP/2 connections in total")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds the streams are held idle")
    parser.add_argument("--parallel", type=int, default=100, help="opens in flight per client process")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.processes < 1 or args.connections < args.processes:
        parser.error("--streams >= 1, --processes >= 1 and --connections >= --processes")
    if args.hold <= 0 or args.parallel < 1:
        parser.error("--hold > 0 and --parallel >= 1")
    machine = machine_info([Path(sys.executable).name, "-m", "bench.idle", *sys.argv[1:]])
    print(f"parent: open files soft limit {raise_nofile()}", flush=True)
    scenarios: dict[str, dict[str, Any]] = {}
    for backend in ("embedded", "scale") if args.backend == "both" else (args.backend,):
        metrics = run_idle(
            backend,
            args.streams,
            processes=args.processes,
            connections=args.connections,
            hold_s=args.hold,
            parallel=args.parallel,
        )
        scenarios[f"idle {backend}"] = metrics
        print(f"idle {backend}: {json.dumps(metrics)}", flush=True)
    print()
    print(table(scenarios))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "scenarios": scenarios}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

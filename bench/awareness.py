"""Awareness fan-out: one user's status change reaching 1,000 subscribers across two replicas.

    python -m bench.awareness [--backend scale|embedded|both] [--subscribers 1000] [--processes 2]
                              [--window 8] [--warmup 2] [--duration 10]

One user, the *star*, has `--subscribers` approved subscribers (set up through RequestSubscription
and ApproveSubscription before the run), each with one device whose awareness stream has its own
connection. On `scale` (PostgreSQL + Redis) there are two awareness replicas in separate processes
and the subscribers alternate between them; the star's device is on the first. On `embedded` one
awareness replica serves everyone (two replicas need Redis to share presence). Messaging runs in its
own process beside them, as awareness tells it when devices come online.

The star changes its intent on its stream, cycling AWAY → BUSY → DND → ONLINE, so every change is a
visible presence change that every subscriber must receive. Two runs per backend:
- *latency*: one change at a time: the next is sent once every subscriber has the previous one. It
  gives the time from the star's write until all subscribers have the change (p50/p99 over changes)
  and until each one has it (p50/p99 over deliveries).
- *peak*: up to `--window` changes outstanding (not yet at every subscriber): presence events
  delivered per second.

Client processes: `--processes` subscriber processes plus one for the star. The processes share the
send time and status of every change through shared memory (the monotonic clock is the same for all
processes on one machine); each subscriber process publishes how many changes all its subscribers
have, which the star reads to keep its window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import grpc

from bench.common import (
    CHANNEL_OPTIONS,
    DRAIN_S,
    Ready,
    Timeline,
    latency_ms,
    machine_info,
    percentile,
    poll_until,
    run_clients,
    sleep_until,
)
from bench.services import DOMAIN, Suite, running
from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.awareness.v1 import awareness_pb2_grpc
from bimip.common.v1 import common_pb2

RESULTS = Path(__file__).parent / "results" / "awareness.json"
STAR = f"star@{DOMAIN}"
CYCLE = (aw.STATUS_AWAY, aw.STATUS_BUSY, aw.STATUS_DND, aw.STATUS_ONLINE)
MAX_CHANGES = 100_000
LAYOUTS = {
    "scale": [["messaging"], ["awareness"], ["awareness"]],
    "embedded": [["messaging", "awareness"]],
}


@dataclass(frozen=True)
class Settings:
    subscribers: int = 1000
    processes: int = 2
    window: int = 8
    warmup: float = 2.0
    duration: float = 10.0

    def __post_init__(self) -> None:
        if self.subscribers < 1 or self.processes < 1 or self.window < 1:
            raise ValueError("--subscribers, --processes and --window must be at least 1")
        if self.duration <= 0 or self.warmup < 0:
            raise ValueError("--duration > 0 and --warmup >= 0")


@dataclass
class Shared:
    """The run's shared memory (created before the client processes are spawned)."""

    sent_at: Any  # double[MAX_CHANGES]: monotonic time just before the star wrote change k
    status: Any  # int[MAX_CHANGES]: the status change k sets
    issued: Any  # int[1]: changes written so far
    done: Any  # int[processes]: changes every subscriber of subscriber process p has

    @classmethod
    def create(cls, processes: int) -> Shared:
        ctx = multiprocessing.get_context("spawn")
        return cls(
            ctx.RawArray("d", MAX_CHANGES),
            ctx.RawArray("i", MAX_CHANGES),
            ctx.RawArray("q", 1),
            ctx.RawArray("q", processes),
        )


@dataclass(frozen=True)
class ClientArgs:
    role: str  # "star" or "subscribers"
    index: int  # subscriber process number
    warmup: float
    duration: float
    window: int
    shared: Shared
    devices: tuple[tuple[str, str, str], ...]  # (address, eid, token)


@dataclass
class ClientResult:
    delivered_in_window: int = 0
    latencies: list[float] = field(default_factory=list)  # per delivery, changes sent in the window
    arrivals: dict[int, tuple[int, float]] = field(default_factory=dict)  # change -> (count, slowest)
    changes_in_window: list[int] = field(default_factory=list)  # star: the changes sent in the window
    counts: Counter[str] = field(default_factory=Counter)


class Stream:
    """One device's awareness stream: open, heartbeats, and a reader calling `on_frame`."""

    def __init__(self, channel: grpc.aio.Channel, call: Any, opened: aw.OpenResponse) -> None:
        self.channel, self.call, self.opened = channel, call, opened
        self.lock = asyncio.Lock()
        self.seq = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False

    @classmethod
    async def open(cls, address: str, token: str) -> Stream:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        call = awareness_pb2_grpc.AwarenessServiceStub(channel).Connect(
            metadata=(("authorization", f"Bearer {token}"),)
        )
        await call.write(aw.ConnectRequest(seq=0, open=aw.OpenRequest()))
        first: Any = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
            raise RuntimeError(f"expected `opened`, got {first!r}")
        return cls(channel, call, first.opened)

    def start(self, on_frame: Any, counts: Counter[str]) -> None:
        self.tasks = [
            asyncio.create_task(self._read(on_frame, counts)),
            asyncio.create_task(self._heartbeats()),
        ]

    async def write(self, **frame: Any) -> None:
        async with self.lock:
            self.seq += 1
            await self.call.write(aw.ConnectRequest(seq=self.seq, **frame))

    async def _read(self, on_frame: Any, counts: Counter[str]) -> None:
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                on_frame(frame, time.monotonic())
            if not self.closing:
                counts["stream ended by the server"] += 1
        except grpc.aio.AioRpcError as err:
            if not self.closing:
                counts[f"stream failed: {err.code().name}"] += 1

    async def _heartbeats(self) -> None:
        interval = self.opened.heartbeat_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self.write(heartbeat=common_pb2.Heartbeat())

    async def close(self) -> None:
        self.closing = True
        reader, beats = self.tasks or (None, None)
        async with self.lock:  # never cancel a writer inside a write: grpc would cancel the call
            if beats is not None:
                beats.cancel()
            with contextlib.suppress(Exception):
                await self.call.done_writing()
        if reader is not None:
            await asyncio.wait({reader}, timeout=5)
        self.call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.channel.close()


async def _open_all(devices: Sequence[tuple[str, str, str]], parallel: int = 50) -> list[Stream]:
    gate = asyncio.Semaphore(parallel)

    async def one(address: str, token: str) -> Stream:
        async with gate:
            return await Stream.open(address, token)

    return list(await asyncio.gather(*(one(address, token) for address, _, token in devices)))


async def subscribers_client(args: ClientArgs, ready: Ready) -> ClientResult:
    """A subscriber process: its subscribers' streams; it records when each change arrives."""
    shared, result = args.shared, ClientResult()
    streams = await _open_all(args.devices)
    received = [0] * len(streams)  # changes each subscriber has
    per_change: dict[int, int] = {}  # change -> local subscribers that have it
    finished: set[int] = set()  # changes all local subscribers have, beyond `done`
    timeline = Timeline(0, 0, 0)
    local = len(streams)

    def on_frame(i: int, frame: aw.ConnectResponse, now: float) -> None:
        kind = frame.WhichOneof("frame")
        if kind != "presence" or frame.presence.eid != STAR:
            if kind not in ("heartbeat", "ack"):
                result.counts[f"{kind} frame"] += 1
            return
        if shared.issued[0] == 0:
            result.counts["star presence before the first change"] += 1
            return
        k = received[i]
        if k >= shared.issued[0]:
            result.counts["star presence beyond the changes sent"] += 1
            return
        received[i] += 1
        if frame.presence.status != shared.status[k]:
            result.counts["presence not the expected change"] += 1
        sent = shared.sent_at[k]
        if timeline.measuring(sent):
            latency = now - sent
            result.latencies.append(latency)
            count, slowest = result.arrivals.get(k, (0, 0.0))
            result.arrivals[k] = (count + 1, max(slowest, latency))
        if timeline.measuring(now):
            result.delivered_in_window += 1
        per_change[k] = n = per_change.get(k, 0) + 1
        if n == local:  # every local subscriber has change k: publish the unbroken prefix
            del per_change[k]
            finished.add(k)
            while shared.done[args.index] in finished:
                finished.discard(shared.done[args.index])
                shared.done[args.index] += 1

    for i, stream in enumerate(streams):
        stream.start(lambda frame, now, i=i: on_frame(i, frame, now), result.counts)
    try:
        timeline = Timeline.of(await ready(), args)
        await sleep_until(timeline.measure_to)
        await poll_until(lambda: shared.done[args.index] >= shared.issued[0], DRAIN_S)
        return result
    finally:
        await asyncio.gather(*(stream.close() for stream in streams))


def _below(done: Any, floor: int) -> bool:
    """Every subscriber process has more than `floor` changes."""
    return bool(min(done) > floor)


async def star_client(args: ClientArgs, ready: Ready) -> ClientResult:
    """The star's device: changes its intent, keeping at most `window` changes outstanding."""
    shared, result = args.shared, ClientResult()
    ((address, _, token),) = args.devices
    stream = await Stream.open(address, token)

    def on_frame(frame: aw.ConnectResponse, now: float) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "error":
            result.counts[f"error: {frame.error.reason}"] += 1
        elif kind not in ("heartbeat", "ack", "intent"):
            result.counts[f"{kind} frame"] += 1

    stream.start(on_frame, result.counts)
    try:
        timeline = Timeline.of(await ready(), args)
        current = CYCLE.index(stream.opened.intent) if stream.opened.intent in CYCLE else len(CYCLE) - 1
        await sleep_until(timeline.start)
        k = 0
        while (now := time.monotonic()) < timeline.measure_to and k < MAX_CHANGES:
            if k - min(shared.done) >= args.window:
                await poll_until(partial(_below, shared.done, k - args.window), DRAIN_S, 0.0005)
                continue
            current = (current + 1) % len(CYCLE)
            shared.status[k] = CYCLE[current]
            shared.sent_at[k] = now
            shared.issued[0] = k + 1
            if timeline.measuring(now):
                result.changes_in_window.append(k)
            await stream.write(intent=aw.IntentRequest(intent=CYCLE[current]))
            k += 1
        # Stay online until every change is everywhere: going OFFLINE is a presence change too.
        await poll_until(lambda: min(shared.done) >= k, DRAIN_S)
        return result
    finally:
        await stream.close()


async def fan_out_client(args: ClientArgs, ready: Ready) -> ClientResult:
    if args.role == "star":
        return await star_client(args, ready)
    return await subscribers_client(args, ready)


# --- set-up and runs ----------------------------------------------------------------------------


def subscriber_eids(n: int) -> list[str]:
    return [f"s{i}@{DOMAIN}" for i in range(n)]


async def subscribe_all(suite: Suite, eids: Sequence[str], parallel: int = 32) -> None:
    """Each subscriber asks to follow the star; the star approves each (A6)."""
    replicas = suite.addresses("awareness")
    channels = [grpc.aio.insecure_channel(address) for address in replicas]
    stubs = [awareness_pb2_grpc.AwarenessServiceStub(channel) for channel in channels]
    star = (("authorization", f"Bearer {suite.token(STAR, 'phone')}"),)
    gate = asyncio.Semaphore(parallel)

    async def one(i: int, eid: str) -> None:
        stub = stubs[i % len(stubs)]
        mine = (("authorization", f"Bearer {suite.token(eid, 'phone')}"),)
        async with gate:
            await stub.RequestSubscription(
                aw.RequestSubscriptionRequest(target_eid=STAR), metadata=mine, timeout=30
            )
            await stub.ApproveSubscription(
                aw.ApproveSubscriptionRequest(subscriber_eid=eid), metadata=star, timeout=30
            )

    try:
        await asyncio.gather(*(one(i, eid) for i, eid in enumerate(eids)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


class FanOutSuite(Protocol):
    """The awareness replicas a fan-out run drives: the service's (`bench.services.Suite`) or the
    bare ceiling's (`bench.fanout.BareFanout`)."""

    @property
    def pids(self) -> list[int]: ...

    def addresses(self, service: str) -> list[str]: ...

    def token(self, eid: str, device_id: str) -> str: ...


def run_fan_out(suite: FanOutSuite, settings: Settings, eids: Sequence[str], window: int) -> dict[str, Any]:
    replicas = suite.addresses("awareness")
    shared = Shared.create(settings.processes)
    devices = [(replicas[i % len(replicas)], eid, suite.token(eid, "phone")) for i, eid in enumerate(eids)]

    def client(role: str, index: int, devices: Sequence[tuple[str, str, str]]) -> ClientArgs:
        return ClientArgs(role, index, settings.warmup, settings.duration, window, shared, tuple(devices))

    n = settings.processes
    per_process = [client("subscribers", p, devices[p::n]) for p in range(n)]
    per_process.append(client("star", 0, [(replicas[0], STAR, suite.token(STAR, "phone"))]))
    clients = run_clients(
        fan_out_client,
        per_process,
        warmup=settings.warmup,
        duration=settings.duration,
        server_pids=suite.pids,
    )
    *subscribers, star_result = clients.results
    counts: Counter[str] = Counter()
    for r in clients.results:
        counts.update(r.counts)
    to_all: list[float] = []
    incomplete = 0
    for k in star_result.changes_in_window:
        got = [r.arrivals.get(k, (0, 0.0)) for r in subscribers]
        if sum(count for count, _ in got) == len(eids):
            to_all.append(max(slowest for _, slowest in got))
        else:
            incomplete += 1
    to_all.sort()
    changes = len(star_result.changes_in_window)
    delivered = sum(r.delivered_in_window for r in subscribers)
    return {
        "window": window,
        "replicas": len(replicas),
        "subscribers": len(eids),
        "changes_per_s": round(changes / settings.duration, 1),
        "events_delivered_per_s": round(delivered / settings.duration, 1),
        "to_all_p50_ms": round(percentile(to_all, 50) * 1000, 2),
        "to_all_p99_ms": round(percentile(to_all, 99) * 1000, 2),
        "to_all_samples": len(to_all),
        **latency_ms([x for r in subscribers for x in r.latencies], "to_each"),
        "incomplete_changes": incomplete,
        "server_cpu_cores": clients.server_cpu,
        "clients_cpu_cores": clients.clients_cpu,
        "frames": dict(sorted(counts.items())),
    }


def replicas_of(backend: str) -> int:
    return sum(1 for process in LAYOUTS[backend] if "awareness" in process)


def run_backend(
    backend: str,
    settings: Settings,
    eids: Sequence[str],
    runs: Sequence[tuple[str, int]],
    say: Callable[[str], None] = print,
    ceilings: dict[int, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The bare fan-out ceiling with this backend's number of replicas (`bench.fanout`; once per
    replica count when `ceilings` is shared between calls), then the awareness service's `runs`
    ((name, window) pairs) on `backend`. The latency run also gets its p99 to all as a multiple of
    the ceiling's."""
    from bench.fanout import run_bare_fan_out

    results: dict[str, dict[str, Any]] = {}
    replicas = replicas_of(backend)
    ceilings = {} if ceilings is None else ceilings
    bare_name = f"awareness bare {replicas}× fan-out latency"
    if replicas not in ceilings:
        ceilings[replicas] = run_bare_fan_out(settings, replicas)
        results[bare_name] = ceilings[replicas]
        say(f"{bare_name}: {_shown(ceilings[replicas])}")
    bare = ceilings[replicas]
    with running(backend, LAYOUTS[backend]) as suite:
        started = time.monotonic()
        asyncio.run(subscribe_all(suite, eids))
        say(f"awareness {backend}: {len(eids):,} subscriptions in {time.monotonic() - started:.1f} s")
        for name, window in runs:
            metrics = run_fan_out(suite, settings, eids, window)
            if window == 1 and bare["to_all_p99_ms"]:
                metrics["to_all_p99_vs_bare"] = round(metrics["to_all_p99_ms"] / bare["to_all_p99_ms"], 3)
                metrics["to_all_p50_vs_bare"] = round(metrics["to_all_p50_ms"] / bare["to_all_p50_ms"], 3)
            results[f"awareness {backend} {name}"] = metrics
            say(f"awareness {backend} {name}: {_shown(metrics)}")
            if metrics["frames"]:
                say(f"  frames: {json.dumps(metrics['frames'])}")
    return results


def _shown(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k != "frames"})


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | replicas | changes/s | presence events/s | to all p50 / p99 ms "
        "| to each p50 / p99 ms | incomplete | CPU cores server / clients |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in scenarios.items():
        lines.append(
            f"| {name} | {m['replicas']} | {m['changes_per_s']:,.1f} | {m['events_delivered_per_s']:,.1f} "
            f"| {m['to_all_p50_ms']:.1f} / {m['to_all_p99_ms']:.1f} "
            f"| {m['to_each_p50_ms']:.1f} / {m['to_each_p99_ms']:.1f} | {m['incomplete_changes']} "
            f"| {m['server_cpu_cores']:.2f} / {m['clients_cpu_cores']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.awareness", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=("scale", "embedded", "both"),
        default="scale",
        help="scale: PostgreSQL + Redis, two awareness replicas; embedded: SQLite, one replica",
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="subscriber client processes")
    parser.add_argument("--window", type=int, default=8, help="changes outstanding in the peak run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--latency-only", action="store_true", help="leave the peak run out")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    try:
        settings = Settings(args.subscribers, args.processes, args.window, args.warmup, args.duration)
    except ValueError as exc:
        parser.error(str(exc))
    machine = machine_info([Path(sys.executable).name, "-m", "bench.awareness", *sys.argv[1:]])
    scenarios: dict[str, dict[str, Any]] = {}
    eids = subscriber_eids(settings.subscribers)
    ceilings: dict[int, dict[str, Any]] = {}
    for backend in ("scale", "embedded") if args.backend == "both" else (args.backend,):
        runs = (("latency", 1),) if args.latency_only else (("latency", 1), ("peak", settings.window))
        scenarios |= run_backend(backend, settings, eids, runs, ceilings=ceilings)
    print()
    print(table(scenarios))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "settings": settings.__dict__, "scenarios": scenarios}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

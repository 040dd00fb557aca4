"""Messaging throughput and latency on the Connect stream, next to the bare gRPC echo ceiling.

    python -m bench.messaging [--backend embedded|scale|both] [--users 50 --inflight 8 --size 100
                              --warmup 3 --duration 20 --processes 2] [--pace F ... | --rate R ...]

The reference workload (the defaults): 50 users in pairs, each with two connected devices d1 and d2,
every stream on its own connection. Each user sends to its partner from d1, keeping 8 messages of 100
bytes in flight; a message is in flight until BOTH of the partner's devices received it. Every device
acks cumulatively (the highest offset it received, one ack in flight at a time, so acks batch
themselves). The clients run in 2 processes, both users of a pair in the same one; the service runs
alone in its own process (`bimip run messaging`). After a warm-up, one window is measured.

Runs, in order: the echo ceiling (bench/echo.py, same layout); then per backend the closed-loop peak,
and a run paced at half the measured peak for latency (`--pace` for other fractions; each paced run
uses its own fresh users on the same server); `--rate` runs paced at fixed rates instead, for
what a message costs at low load. Prints a table and writes bench/results/messaging.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    CHANNEL_OPTIONS,
    DRAIN_S,
    Ready,
    Timeline,
    Workload,
    latency_ms,
    machine_info,
    run_clients,
    sleep_until,
)
from bench.echo import run_echo, workload_arguments, workload_of
from bench.services import DOMAIN, Suite, running
from bimip.common.v1 import common_pb2
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from bimip.sdk.client import MAX_BATCH as SDK_MAX_BATCH
from bimip.sdk.frames import deliveries_in

RESULTS = Path(__file__).parent / "results" / "messaging.json"


# --- one client process -------------------------------------------------------------------------


@dataclass(frozen=True)
class UserSpec:
    index: int
    eid: str
    peer_eid: str
    tokens: tuple[str, str]  # d1, d2


@dataclass(frozen=True)
class ClientArgs:
    addresses: tuple[str, ...]  # messaging replicas: user n's devices connect to addresses[n % len]
    workload: Workload
    users: tuple[UserSpec, ...]
    rate_per_sender: float | None  # None: closed loop, as fast as the in-flight window allows
    max_batch: int  # OpenRequest.max_batch: entries the devices take in one frame


@dataclass
class ClientResult:
    delivered: int = 0  # messages whose second recipient device got them inside the window
    sent_in_window: int = 0
    sent_latencies: list[float] = field(default_factory=list)  # send -> SENT, sends inside the window
    delivered_latencies: list[float] = field(default_factory=list)  # send -> both devices
    incomplete: int = 0  # sent inside the window, not delivered to both within DRAIN_S after it
    frames_in_window: int = 0  # frames on the wire inside the window, both ways, every stream
    counts: Counter[str] = field(default_factory=Counter)  # frames worth reporting, whole run


@dataclass(eq=False)
class Pending:
    sent_at: float
    slots: asyncio.Semaphore  # the sender's in-flight window
    sent_acked: bool = False
    devices: set[str] = field(default_factory=set)


class Run:
    """The state one client process shares between its devices."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.pending: dict[str, Pending] = {}
        self.result = ClientResult()
        self.progress = asyncio.Event()  # a message settled

    def _settle(self, client_id: str, p: Pending) -> None:
        if p.sent_acked and len(p.devices) == 2:
            del self.pending[client_id]
            self.progress.set()

    def on_sent(self, client_id: str, now: float) -> None:
        p = self.pending.get(client_id)
        if p is None or p.sent_acked:
            self.result.counts["SENT for an unknown message"] += 1
            return
        p.sent_acked = True
        if self.timeline.measuring(p.sent_at):
            self.result.sent_latencies.append(now - p.sent_at)
        self._settle(client_id, p)

    def on_received(self, client_id: str, device_id: str, now: float) -> None:
        p = self.pending.get(client_id)
        if p is None or device_id in p.devices:
            self.result.counts["delivery of a message the device already had"] += 1
            return
        p.devices.add(device_id)
        if len(p.devices) == 2:
            if self.timeline.measuring(now):
                self.result.delivered += 1
            if self.timeline.measuring(p.sent_at):
                self.result.delivered_latencies.append(now - p.sent_at)
            p.slots.release()
            self._settle(client_id, p)

    def on_send_refused(self, client_id: str, reason: str) -> None:
        self.result.counts[f"send refused: {reason}"] += 1
        p = self.pending.pop(client_id, None)
        if p is not None and len(p.devices) < 2:
            p.slots.release()

    def in_window_pending(self) -> int:
        return sum(1 for p in self.pending.values() if self.timeline.measuring(p.sent_at))


class Device:
    """One device's Connect stream: a reader, an acker, and a lock so writers take turns."""

    def __init__(self, eid: str, device_id: str, channel: grpc.aio.Channel, call: Any, run: Run) -> None:
        self.eid, self.device_id, self.channel, self.call, self.run = eid, device_id, channel, call, run
        self.counts = run.result.counts
        self._lock = asyncio.Lock()
        self._seq = 0
        self.sends: dict[int, str] = {}  # seq -> client id, until SENT or refused
        self.highest = 0  # highest offset received
        self.acked = 0
        self.ack_seq = -1
        self.ack_wanted = asyncio.Event()
        self.ack_answered = asyncio.Event()
        self.closing = False
        self.tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(
        cls, address: str, token: str, eid: str, device_id: str, run: Run, max_batch: int
    ) -> Device:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = messaging_pb2_grpc.MessagingServiceStub(channel)
        call = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
        await call.write(
            messaging_pb2.ConnectRequest(seq=0, open=messaging_pb2.OpenRequest(max_batch=max_batch))
        )
        first: Any = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
            raise RuntimeError(f"{eid}/{device_id}: expected `opened`, got {first!r}")
        device = cls(eid, device_id, channel, call, run)
        device.tasks = [asyncio.create_task(device._read()), asyncio.create_task(device._ack_loop())]
        return device

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def write(self, request: messaging_pb2.ConnectRequest) -> None:
        async with self._lock:
            await self.call.write(request)
        if self.run.timeline.measuring(time.monotonic()):
            self.run.result.frames_in_window += 1

    async def _read(self) -> None:
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                now = time.monotonic()
                if self.run.timeline.measuring(now):
                    self.run.result.frames_in_window += 1
                self._frame(frame, now)
            if not self.closing:
                self.counts["stream ended by the server"] += 1
        except grpc.aio.AioRpcError as err:
            if not self.closing:
                self.counts[f"stream failed: {err.code().name}"] += 1

    def _frame(self, frame: messaging_pb2.ConnectResponse, now: float) -> None:
        kind = frame.WhichOneof("frame")
        if kind in ("delivery", "deliveries"):
            for delivery, _ in deliveries_in(frame):
                self._delivery(delivery, now)
        elif kind == "sent":
            self.sends.pop(frame.seq, None)
            if frame.sent.duplicate:
                self.counts["SENT marked duplicate"] += 1
            self.run.on_sent(frame.sent.client_id, now)
        elif kind == "cursor":
            if frame.seq == self.ack_seq:
                self.ack_answered.set()
            elif frame.seq == 0:
                self.counts["cursor moved by the server (passed over)"] += 1
        elif kind == "error":
            reason = frame.error.reason or str(frame.error.code)
            if frame.seq in self.sends:
                self.run.on_send_refused(self.sends.pop(frame.seq), reason)
            else:
                self.counts[f"error frame: {reason}"] += 1
                if frame.seq == self.ack_seq:
                    self.ack_answered.set()
        elif kind != "heartbeat":
            self.counts[f"unexpected frame: {kind}"] += 1

    def _delivery(self, delivery: messaging_pb2.Delivery, now: float) -> None:
        entry = delivery.entry
        if delivery.replay:
            self.counts["replay delivery"] += 1
            return
        if delivery.redelivery:
            self.counts["redelivery"] += 1
        elif entry.offset <= self.highest:
            self.counts["delivery at or below an offset already received"] += 1
        self.highest = max(self.highest, entry.offset)
        body = entry.WhichOneof("body")
        if body == "message":
            if entry.message.sender.eid == self.eid:
                self.counts["mirror copy (d2)" if self.device_id == "d2" else "own message back (d1)"] += 1
            else:
                self.run.on_received(entry.message.client_id, self.device_id, now)
        else:
            self.counts[f"{body} entry"] += 1
        self.ack_wanted.set()

    async def _ack_loop(self) -> None:
        """Cumulative acks, one in flight: what arrives meanwhile is covered by the next one."""
        while True:
            await self.ack_wanted.wait()
            self.ack_wanted.clear()
            offset = self.highest
            if offset <= self.acked:
                continue
            self.ack_seq = self.next_seq()
            self.ack_answered.clear()
            await self.write(
                messaging_pb2.ConnectRequest(seq=self.ack_seq, ack=messaging_pb2.AckRequest(offset=offset))
            )
            self.acked = offset
            self.counts["acks sent"] += 1
            try:
                async with asyncio.timeout(30):  # wait_for may swallow close()'s cancel (3.11)
                    await self.ack_answered.wait()
            except TimeoutError:
                self.counts["ack unanswered for 30 s"] += 1

    async def close(self) -> None:
        """Half-close and let the server end the stream; cancel only if it does not within 5 s."""
        self.closing = True
        reader, acker = self.tasks
        async with self._lock:  # never cancel the acker inside a write: grpc would cancel the call
            acker.cancel()
            with contextlib.suppress(Exception):
                await self.call.done_writing()
        await asyncio.wait({reader}, timeout=5)
        self.call.cancel()
        reader.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.channel.close()


async def _send_loop(user: UserSpec, d1: Device, args: ClientArgs, run: Run) -> None:
    workload, timeline, result = args.workload, run.timeline, run.result
    slots = asyncio.Semaphore(workload.inflight)
    payload = os.urandom(workload.size)
    interval = 1 / args.rate_per_sender if args.rate_per_sender else 0.0
    due = timeline.start + random.uniform(0, interval)  # paced senders start spread over one interval
    n = 0
    while True:
        if due >= timeline.measure_to:
            return
        await sleep_until(due)
        due += interval
        try:
            async with asyncio.timeout(max(0.01, timeline.measure_to - time.monotonic())):
                await slots.acquire()
        except TimeoutError:
            return
        now = time.monotonic()
        client_id = f"{user.index}-{n}"
        n += 1
        run.pending[client_id] = Pending(now, slots)
        if timeline.measuring(now):
            result.sent_in_window += 1
        seq = d1.next_seq()
        d1.sends[seq] = client_id
        message = common_pb2.Message(
            client_id=client_id,
            recipient=common_pb2.Identity(eid=user.peer_eid),
            type=common_pb2.MESSAGE_TYPE_CHAT,
            payload=payload,
        )
        await d1.write(messaging_pb2.ConnectRequest(seq=seq, send=messaging_pb2.SendRequest(message=message)))


async def messaging_client(args: ClientArgs, ready: Ready) -> ClientResult:
    """One client process: connect every device of its users, wait for the start, run, drain."""
    run = Run(Timeline(0, 0, 0))
    connects = [
        Device.connect(
            args.addresses[user.index % len(args.addresses)], token, user.eid, device_id, run, args.max_batch
        )
        for user in args.users
        for device_id, token in zip(("d1", "d2"), user.tokens, strict=True)
    ]
    devices = list(await asyncio.gather(*connects))
    try:
        run.timeline = Timeline.of(await ready(), args.workload)
        senders = [(user, devices[2 * i]) for i, user in enumerate(args.users)]
        await asyncio.gather(*(_send_loop(user, d1, args, run) for user, d1 in senders))
        deadline = time.monotonic() + DRAIN_S
        while run.in_window_pending() and (left := deadline - time.monotonic()) > 0:
            run.progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await run.progress.wait()
        run.result.incomplete = run.in_window_pending()
        return run.result
    finally:
        await asyncio.gather(*(device.close() for device in devices))


# --- the runs -----------------------------------------------------------------------------------


def run_messaging(
    server: Suite, workload: Workload, label: str, rate: float | None, max_batch: int = SDK_MAX_BATCH
) -> dict[str, Any]:
    """One run with fresh users (eids `<label><n>@bench.example`): closed loop, or paced at `rate`
    messages per second in total; the devices take up to `max_batch` entries per frame (the SDK's
    default; 1: a frame per entry)."""
    eids = [f"{label}{i}@{DOMAIN}" for i in range(workload.users)]
    users = [
        UserSpec(i, eids[i], eids[i ^ 1], (server.token(eids[i], "d1"), server.token(eids[i], "d2")))
        for i in range(workload.users)
    ]
    per_sender = None if rate is None else rate / workload.users
    per_process = [
        ClientArgs(
            tuple(server.addresses("messaging")),  # with two replicas, partners are on different ones
            workload,
            tuple(user for pair in workload.pairs_of(p) for user in users[2 * pair : 2 * pair + 2]),
            per_sender,
            max_batch,
        )
        for p in range(workload.processes)
    ]
    clients = run_clients(
        messaging_client,
        per_process,
        warmup=workload.warmup,
        duration=workload.duration,
        server_pids=server.pids,
    )
    results = clients.results
    counts: Counter[str] = Counter()
    for r in results:
        counts.update(r.counts)
    metrics: dict[str, Any] = {}
    if rate is not None:
        metrics["target_per_s"] = round(rate, 1)
    delivered = sum(r.delivered for r in results)
    frames = sum(r.frames_in_window for r in results)
    metrics |= {
        "delivered_per_s": round(delivered / workload.duration, 1),
        # Every frame on every stream, both ways (sends, SENTs, deliveries, receipts, acks and their
        # cursor answers, heartbeats): what the protocol asks of gRPC per delivered message.
        "frames_per_s": round(frames / workload.duration, 1),
        "frames_per_message": round(frames / delivered, 2) if delivered else 0.0,
        "sent_per_s": round(sum(r.sent_in_window for r in results) / workload.duration, 1),
        **latency_ms([x for r in results for x in r.sent_latencies], "sent"),
        **latency_ms([x for r in results for x in r.delivered_latencies], "delivered"),
        "incomplete": sum(r.incomplete for r in results),
        "server_cpu_cores": clients.server_cpu,
        "clients_cpu_cores": clients.clients_cpu,
        "frames": dict(sorted(counts.items())),
    }
    return metrics


def _row(name: str, m: dict[str, Any], echo: float) -> str:
    def ms(prefix: str) -> str:
        return f"{m[f'{prefix}_p50_ms']:.1f} / {m[f'{prefix}_p99_ms']:.1f}"

    if "round_trips_per_s" in m:
        rate, sent, delivered = m["round_trips_per_s"], "-", ms("round_trip") + " (rt)"
    else:
        rate, sent, delivered = m["delivered_per_s"], ms("sent"), ms("delivered")
    cpu = f"{m['server_cpu_cores']:.2f} / {m['clients_cpu_cores']:.2f}"
    return f"| {name} | {rate:,.1f} | {rate / echo:.3f} | {sent} | {delivered} | {cpu} |"


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    echo = scenarios["echo"]["round_trips_per_s"]
    lines = [
        "| scenario | msgs/s (delivered to both) | / echo | send→SENT p50 / p99 ms "
        "| send→delivered p50 / p99 ms | CPU cores server / clients |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [_row(name, m, echo) for name, m in scenarios.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.messaging", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=("embedded", "scale", "both"),
        default="embedded",
        help="embedded: SQLite, in-process pub/sub; scale: PostgreSQL + Redis",
    )
    workload_arguments(parser)
    parser.add_argument(
        "--pace",
        type=float,
        action="append",
        metavar="FRACTION",
        help="after the peak, a run paced at this fraction of it (repeatable; default 0.5)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        metavar="MSGS_PER_S",
        help="instead of the peak and its fractions: runs paced at these rates (messages/s in all)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=SDK_MAX_BATCH,
        help=f"entries a device takes in one frame (OpenRequest.max_batch; default {SDK_MAX_BATCH}, as the "
        "SDK; 1: one frame per entry)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    try:
        workload = workload_of(args)
    except ValueError as exc:
        parser.error(str(exc))
    machine = machine_info([Path(sys.executable).name, "-m", "bench.messaging", *sys.argv[1:]])
    scenarios: dict[str, dict[str, Any]] = {}

    def done(name: str, metrics: dict[str, Any]) -> None:
        scenarios[name] = metrics
        shown = {k: v for k, v in metrics.items() if k != "frames"}
        print(f"{name}: {json.dumps(shown)}", flush=True)
        if metrics.get("frames"):
            print(f"  frames: {json.dumps(metrics['frames'])}", flush=True)

    print(f"workload: {json.dumps(workload.as_dict())}", flush=True)
    done("echo", run_echo(workload))
    for backend in ("embedded", "scale") if args.backend == "both" else (args.backend,):
        with running(backend, [["messaging"]]) as server:
            if args.rate:
                for i, rate in enumerate(args.rate):
                    done(
                        f"messaging {backend} paced {rate:g}/s",
                        run_messaging(server, workload, f"r{i}x", rate, args.max_batch),
                    )
                continue
            peak = run_messaging(server, workload, "u", None, args.max_batch)
            done(f"messaging {backend} peak", peak)
            for i, fraction in enumerate(args.pace or [0.5]):
                if peak["delivered_per_s"] > 0:
                    paced = run_messaging(
                        server, workload, f"p{i}x", peak["delivered_per_s"] * fraction, args.max_batch
                    )
                    done(f"messaging {backend} paced {fraction:.0%}", paced)
    echo_rate = scenarios["echo"]["round_trips_per_s"]
    for metrics in scenarios.values():
        rate = metrics.get("delivered_per_s", metrics.get("round_trips_per_s", 0.0))
        metrics["ratio_to_echo"] = round(rate / echo_rate, 4)
    print()
    print(table(scenarios))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine,
        "workload": workload.as_dict() | {"max_batch": args.max_batch},
        "scenarios": scenarios,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

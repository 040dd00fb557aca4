"""The ceiling: a bare `grpc.aio` bidirectional-streaming echo, bytes in and bytes out.

Same layout as the messaging benchmark: the server in its own process, the clients in
`workload.processes` processes, one connection per stream, two streams per user of which one (the
"d1" stream) keeps `workload.inflight` frames of `workload.size` bytes in flight and the other is open
and idle. A round trip is one frame there and back on the same stream. No protobuf, no storage: what
is left is the cost of gRPC and asyncio on this machine.

    python -m bench.echo [--users 50 --inflight 8 --size 100 --warmup 3 --duration 20 --processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.common import (
    CHANNEL_OPTIONS,
    DRAIN_S,
    Ready,
    Timeline,
    Workload,
    latency_ms,
    run_clients,
    sleep_until,
    spawn_server,
    stop_server,
)

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


# --- server -------------------------------------------------------------------------------------


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


def _serve(conn: Connection) -> None:
    """Process target: serve the echo on a free port, tell the parent the port, stop when told."""

    async def main() -> None:
        server = grpc.aio.server()
        # No (de)serializers: the handler sees and returns the frames' bytes.
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(_echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await asyncio.to_thread(conn.recv)
        await server.stop(0)

    asyncio.run(main())


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """An echo server in its own process; yields its address and process id."""
    server, port = spawn_server(_serve, what="the echo server")
    try:
        assert server[0].pid is not None
        yield f"127.0.0.1:{port}", server[0].pid
    finally:
        stop_server(server)


# --- clients ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoClientArgs:
    address: str
    workload: Workload
    users: int  # users this process plays: two streams each
    per_stream: float | None = None  # frames per second per sending stream; None = closed loop


@dataclass
class EchoResult:
    round_trips: int = 0  # completed inside the window
    latencies: list[float] = field(default_factory=list)  # of round trips started inside the window
    sent_in_window: int = 0
    incomplete: int = 0


async def _stream(
    call: Any, workload: Workload, timeline: Timeline, result: EchoResult, per_stream: float | None = None
) -> None:
    """Keep `inflight` frames in flight on one stream until the window ends (paced at `per_stream`
    frames per second if given, still at most `inflight` in flight); then drain."""
    slots = asyncio.Semaphore(workload.inflight)
    sent: dict[int, float] = {}
    padding = b"x" * (workload.size - 8)

    async def read() -> None:
        while (frame := await call.read()) is not grpc.aio.EOF:
            now = time.monotonic()
            began = sent.pop(int.from_bytes(frame[:8], "big"))
            if timeline.measuring(now):
                result.round_trips += 1
            if timeline.measuring(began):
                result.latencies.append(now - began)
            slots.release()

    reader = asyncio.create_task(read())
    await sleep_until(timeline.start)
    n = 0
    # Paced streams start spread over one interval, as the messaging benchmark's senders do.
    due = timeline.start + (random.uniform(0, 1 / per_stream) if per_stream else 0.0)
    while time.monotonic() < timeline.measure_to:
        if per_stream:
            await sleep_until(due)
            due += 1 / per_stream
        async with asyncio.timeout(30):
            await slots.acquire()
        began = time.monotonic()
        sent[n] = began
        if timeline.measuring(began):
            result.sent_in_window += 1
        await call.write(n.to_bytes(8, "big") + padding)
        n += 1
    await call.done_writing()
    try:
        async with asyncio.timeout(DRAIN_S):  # the reader is cancelled if it runs out
            await reader
    except TimeoutError:
        result.incomplete += sum(1 for began in sent.values() if timeline.measuring(began))


async def echo_client(args: EchoClientArgs, ready: Ready) -> EchoResult:
    """One client process: open two streams per user (one round trip each), then run."""
    channels = [
        grpc.aio.insecure_channel(args.address, options=CHANNEL_OPTIONS) for _ in range(2 * args.users)
    ]
    try:
        calls: list[grpc.aio.StreamStreamCall[bytes, bytes]] = [
            channel.stream_stream(METHOD)() for channel in channels
        ]
        for call in calls:  # every stream really open before the start
            await call.write(b"\0" * args.workload.size)
            await call.read()
        timeline = Timeline.of(await ready(), args.workload)
        result = EchoResult()
        senders, idle = calls[: args.users], calls[args.users :]
        await asyncio.gather(
            *(_stream(call, args.workload, timeline, result, args.per_stream) for call in senders)
        )
        for call in idle:
            await call.done_writing()
        return result
    finally:
        for channel in channels:
            await channel.close()


def run_echo(workload: Workload, rate: float | None = None) -> dict[str, float]:
    """The echo ceiling for `workload`: round trips per second and their latency; closed loop,
    or paced at `rate` round trips per second in all."""
    per_stream = None if rate is None else rate / workload.users
    with echo_server() as (address, pid):
        per_process = [
            EchoClientArgs(address, workload, 2 * len(workload.pairs_of(process)), per_stream)
            for process in range(workload.processes)
        ]
        run = run_clients(
            echo_client,
            per_process,
            warmup=workload.warmup,
            duration=workload.duration,
            server_pids=[pid],
        )
    results = run.results
    latencies = [x for r in results for x in r.latencies]
    return {
        **({"target_per_s": round(rate, 1)} if rate is not None else {}),
        "round_trips_per_s": round(sum(r.round_trips for r in results) / workload.duration, 1),
        **latency_ms(latencies, "round_trip"),
        "incomplete": sum(r.incomplete for r in results),
        "server_cpu_cores": run.server_cpu,
        "clients_cpu_cores": run.clients_cpu,
    }


def workload_arguments(parser: argparse.ArgumentParser) -> None:
    default = Workload()
    parser.add_argument("--users", type=int, default=default.users, help="users, in pairs")
    parser.add_argument("--inflight", type=int, default=default.inflight, help="in flight per sender")
    parser.add_argument("--size", type=int, default=default.size, help="payload bytes")
    parser.add_argument("--warmup", type=float, default=default.warmup, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=default.duration, help="seconds measured")
    parser.add_argument("--processes", type=int, default=default.processes, help="client processes")


def workload_of(args: argparse.Namespace) -> Workload:
    return Workload(args.users, args.inflight, args.size, args.warmup, args.duration, args.processes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.splitlines()[0])
    workload_arguments(parser)
    args = parser.parse_args(argv)
    try:
        workload = workload_of(args)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(run_echo(workload), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The awareness ceiling: a bare `grpc.aio` fan-out with the awareness benchmark's layout.

The awareness benchmark's clients (the same code, unchanged) run against servers that do nothing but
gRPC and asyncio: no token check, no storage, no Redis, no interceptors. Each server process holds
the subscriber streams connected to it; when the star's stream brings an intent frame, the first
server builds the presence frame once, serializes it once, forwards the bytes down a chain of the
other servers over one gRPC stream each (in place of the Redis hop), and each writes them to every local
subscriber stream, each from that stream's own task (as every real service writes its streams). What
the awareness service adds on top of that is its own cost; what is left here is the cost of writing
1,000 frames on 1,000 connections and reading them in the client processes on this machine.

    python -m bench.fanout [--replicas 2] [--subscribers 1000] [--processes 2] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.awareness import STAR, Settings, run_fan_out, subscriber_eids
from bench.common import ServerProcess, spawn_server, stop_server
from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.cli import tune_gc

RELAY_SERVICE = "bench.Fanout"
RELAY = f"/{RELAY_SERVICE}/Relay"
HEARTBEAT_MS = 10_000  # the awareness service's default heartbeat interval


class _Replica:
    """One bare fan-out server: its subscriber streams' outboxes and, on every replica but the last,
    the relay stream to the next one."""

    def __init__(self) -> None:
        self.outboxes: set[asyncio.Queue[bytes | None]] = set()
        self.relay: Any = None  # the relay call to the next replica

    async def fan_out(self, frame: bytes) -> None:
        """Pass `frame` down the chain of replicas, then to every local subscriber stream."""
        if self.relay is not None:
            await self.relay.write(frame)
        for outbox in self.outboxes:
            outbox.put_nowait(frame)

    async def connect(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        first = aw.ConnectRequest.FromString(await anext(requests))
        yield aw.ConnectResponse(
            seq=first.seq,
            opened=aw.OpenResponse(
                heartbeat_interval_ms=HEARTBEAT_MS, presence_ttl_ms=3 * HEARTBEAT_MS, intent=aw.STATUS_ONLINE
            ),
        ).SerializeToString()
        outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        # Every stream but the star's subscribes (the suite's "token" is the device's eid).
        if dict(context.invocation_metadata() or ()).get("authorization") != f"Bearer {STAR}":
            self.outboxes.add(outbox)
        reader = asyncio.create_task(self._read(requests, outbox))
        try:
            while (frame := await outbox.get()) is not None:
                yield frame
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[bytes], outbox: asyncio.Queue[bytes | None]) -> None:
        async for raw in requests:
            request = aw.ConnectRequest.FromString(raw)
            if request.WhichOneof("frame") == "intent":  # the star
                frame = aw.ConnectResponse(
                    presence=aw.Presence(eid=STAR, status=request.intent.intent)
                ).SerializeToString()
                await self.fan_out(frame)
        self.outboxes.discard(outbox)
        outbox.put_nowait(None)

    async def relayed(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        async for frame in requests:
            await self.fan_out(frame)
        return b""


def _serve(conn: Connection, relay_to: str | None) -> None:
    """Process target: serve the bare fan-out on a free port, tell the parent the port, stop when
    told."""

    async def main() -> None:
        replica = _Replica()
        server = grpc.aio.server()
        connect: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_stream_rpc_method_handler(replica.connect)
        relay: grpc.RpcMethodHandler[bytes, bytes] = grpc.stream_unary_rpc_method_handler(replica.relayed)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "bimip.awareness.v1.AwarenessService", {"Connect": connect}
                ),
                grpc.method_handlers_generic_handler(RELAY_SERVICE, {"Relay": relay}),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = None
        if relay_to is not None:
            channel = grpc.aio.insecure_channel(relay_to)
            replica.relay = channel.stream_unary(RELAY)()
        tune_gc()  # the collector as `bimip run` sets it, so the ceiling is not handicapped by it
        conn.send(port)
        await asyncio.to_thread(conn.recv)
        if channel is not None:
            await channel.close()
        await server.stop(0)

    asyncio.run(main())


@dataclass
class BareFanout:
    """What `bench.awareness.run_fan_out` needs of a suite: the replicas' addresses, tokens (a
    device's "token" is its eid, so a server can tell the star's stream; nothing is checked) and the
    server processes."""

    replicas: list[str]
    pids: list[int]

    def addresses(self, service: str) -> list[str]:
        return list(self.replicas)

    def token(self, eid: str, device_id: str) -> str:
        return eid


@contextlib.contextmanager
def fanout_servers(replicas: int) -> Iterator[BareFanout]:
    """`replicas` bare fan-out servers, each in its own process, each relaying to the next."""
    if replicas < 1:
        raise ValueError("--replicas must be at least 1")
    started: list[ServerProcess] = []
    addresses: list[str] = []
    try:
        # The last replica first: each earlier one relays to the one after it.
        for _ in range(replicas):
            relay_to = addresses[0] if addresses else None
            server, port = spawn_server(_serve, relay_to, what="a fan-out server")
            started.insert(0, server)
            addresses.insert(0, f"127.0.0.1:{port}")
        yield BareFanout(addresses, [p.pid for p, _ in started if p.pid is not None])
    finally:
        for server in started:
            stop_server(server)


def run_bare_fan_out(settings: Settings, replicas: int) -> dict[str, Any]:
    """The awareness latency run (one change at a time) against bare fan-out servers: the same
    clients, the same layout."""
    with fanout_servers(replicas) as suite:
        return run_fan_out(suite, settings, subscriber_eids(settings.subscribers), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="subscriber client processes")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    try:
        settings = Settings(args.subscribers, args.processes, 1, args.warmup, args.duration)
    except ValueError as exc:
        parser.error(str(exc))
    metrics = run_bare_fan_out(settings, args.replicas)
    print(json.dumps({k: v for k, v in metrics.items() if k != "frames"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

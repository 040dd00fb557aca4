"""SPEC public scenario 7 (cross-replica), M7 across replicas, and X5: a missed notice loses nothing.

Two messaging replicas share one database. On the scale backend they are two real processes
(`bimip run messaging`) with PostgreSQL and Redis between them; on the embedded backend they are two
messaging services in this process sharing the SQLite file and the in-process bus, as the embedded
default's services hear each other.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import redis.asyncio as aioredis

from bimip.common.v1 import common_pb2
from bimip.core.auth import Keys, ServiceCredentials
from bimip.core.config import CoreSettings, load_settings
from bimip.core.errors import reason_of
from bimip.core.server import RunningService, Shared, start_service
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc, messaging_pb2
from services.messaging.app import build as build_messaging
from services.messaging.config import MessagingSettings
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import Device, connect, message
from tests.processes import ServiceProcess, free_ports, running_processes, tcp_local_ports, token
from tests.suite import suite_env

A, B = "alice@example.com", "bob@example.com"
DELIVERED = common_pb2.DELIVERY_STATUS_DELIVERED
# Each replica also re-checks its users' heads every heartbeat interval (the safety net for a missed
# notice). With the heartbeat far beyond the tests' deadlines, only the fan-out between replicas can
# deliver in time.
NO_HEARTBEAT_RESCUE = {"BIMIP_HEARTBEAT_INTERVAL_S": "120"}


@dataclass
class Replicas:
    """Two messaging replicas of one deployment: where they listen and how to get a token."""

    addresses: list[str]
    env: dict[str, str]
    processes: Sequence[ServiceProcess] = ()  # the scale backend's processes
    opened: list[Device] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, replica: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.addresses[replica])
        self.channels.append(channel)
        return channel

    async def connect(self, channel: grpc.aio.Channel, name: str, processed_offset: int = 0) -> Device:
        eid, device_id = name.split("/")
        device = await connect(channel, token(self.env, eid, device_id), eid, device_id, processed_offset)
        self.opened.append(device)
        return device


@asynccontextmanager
async def replicas(backend: Backend, tmp_path: Path, **extra: str) -> AsyncIterator[Replicas]:
    env = suite_env(backend, tmp_path, **extra)
    if backend.redis_url is None:
        shared = Shared(load_settings(CoreSettings, env))
        services: list[RunningService] = []
        try:
            for replica in ("r1", "r2"):
                settings = load_settings(MessagingSettings, {**env, "BIMIP_REPLICA_ID": replica})
                services.append(await start_service("messaging", build_messaging, shared, settings))
            rs = Replicas([s.address for s in services], env)
            try:
                yield rs
            finally:
                await _close(rs)
        finally:
            for service in reversed(services):
                await service.stop(grace=0.5)
        return
    ports = free_ports(2)
    processes = [
        ServiceProcess("messaging", {**env, "BIMIP_REPLICA_ID": f"r{i}"}, tmp_path / f"r{i}.log", port=port)
        for i, port in enumerate(ports, start=1)
    ]
    async with running_processes(processes):
        rs = Replicas([p.address for p in processes], env, processes)
        try:
            yield rs
        finally:
            await _close(rs)


async def _close(rs: Replicas) -> None:
    for device in rs.opened:
        await device.close()
    for channel in rs.channels:
        await channel.close()


def _client_ids(entries: Sequence[common_pb2.Entry]) -> list[str]:
    return [e.message.client_id for e in entries if e.WhichOneof("body") == "message"]


async def _replaced(device: Device) -> None:
    """M7: the stream ended with ABORTED / CONNECTED_ELSEWHERE."""
    await eventually(lambda: device.finished, timeout=10)
    assert device.ended is not None, "the replaced stream ended without an error status"
    assert device.ended.code() == grpc.StatusCode.ABORTED, device.ended
    assert reason_of(device.ended) == "CONNECTED_ELSEWHERE", device.ended


async def test_scenario_7_cross_replica_delivery_receipts_and_mirror(
    backend: Backend, tmp_path: Path
) -> None:
    """A1 on replica 1 sends; B1 on replica 2 receives in order; B1's ack on replica 2 reaches A1
    on replica 1 as DELIVERED; A2 on replica 2 gets the mirror; nothing arrives twice."""
    async with replicas(backend, tmp_path, **NO_HEARTBEAT_RESCUE) as rs:
        r1, r2 = rs.channel(0), rs.channel(1)
        a1 = await rs.connect(r1, f"{A}/a1")
        a2 = await rs.connect(r2, f"{A}/a2")
        b1 = await rs.connect(r2, f"{B}/b1")

        acks = [await a1.sent(message(B, f"m-{i}", f"payload {i}".encode())) for i in range(5)]
        assert [a.offset for a in acks] == [1, 2, 3, 4, 5]
        assert len({a.signal_id for a in acks}) == 5 and not any(a.duplicate for a in acks)

        entries = await b1.wait_entries(5)
        assert [e.offset for e in entries] == [1, 2, 3, 4, 5]
        assert _client_ids(entries) == [f"m-{i}" for i in range(5)]
        assert [e.message.payload for e in entries] == [f"payload {i}".encode() for i in range(5)]
        assert [e.message.signal_id for e in entries] == [a.signal_id for a in acks]
        assert all(e.peer_eid == A and e.message.sender.device_id == "a1" for e in entries)

        mirrors = await a2.wait_entries(5)
        assert [(e.offset, e.message.signal_id) for e in mirrors] == [(a.offset, a.signal_id) for a in acks]

        cursor = await b1.ack(5)
        assert cursor.WhichOneof("frame") == "cursor" and cursor.cursor.cursor == 5
        for sender_device in (a1, a2):
            await sender_device.wait_for(lambda d=sender_device: len(d.receipts()) == 5)
            receipts = sender_device.receipts()
            assert all(r.status == DELIVERED and r.by.eid == B and r.by.device_id == "b1" for r in receipts)
            assert sorted(r.signal_id for r in receipts) == sorted(a.signal_id for a in acks)

        # The other way round: B1 on replica 2 answers, A1 on replica 1 receives it.
        reply = await b1.sent(message(A, "r-0", b"pong"))
        await a1.wait_for(lambda: _client_ids(a1.entries()) == ["r-0"])
        (answer,) = [e for e in a1.entries() if e.WhichOneof("body") == "message"]
        assert answer.message.signal_id == reply.signal_id and answer.message.payload == b"pong"

        # A last message, then the exact lists: everything in order, nothing twice, no own entries.
        last = await a1.sent(message(B, "m-5", b"payload 5"))
        await b1.wait_entries(6)
        await a2.wait_for(lambda: "m-5" in _client_ids(a2.entries()))
        assert b1.offsets() == [1, 2, 3, 4, 5, 7]  # 6 is B1's own reply: passed over (M4)
        assert _client_ids(b1.entries()) == [f"m-{i}" for i in range(6)]
        assert b1.entries()[-1].message.signal_id == last.signal_id
        assert not b1.receipts()
        for device in (a1, a2):
            offsets = device.offsets()
            assert offsets == sorted(set(offsets)), f"{device.device_id}: {offsets}"
        assert _client_ids(a1.entries()) == ["r-0"]  # never its own messages back
        assert _client_ids(a2.entries()) == ["m-0", "m-1", "m-2", "m-3", "m-4", "r-0", "m-5"]
        assert not any(d.redelivery for device in (a1, a2, b1) for d in device.deliveries)


async def test_m7_second_stream_on_the_other_replica_replaces_the_first(
    backend: Backend, tmp_path: Path
) -> None:
    """B1 opens a stream on replica 1 while its stream on replica 2 is open: the old one ends
    with ABORTED / CONNECTED_ELSEWHERE, the new one starts after the durable cursor; and back."""
    async with replicas(backend, tmp_path, **NO_HEARTBEAT_RESCUE) as rs:
        r1, r2 = rs.channel(0), rs.channel(1)
        a1 = await rs.connect(r1, f"{A}/a1")
        first = await rs.connect(r2, f"{B}/b1")
        for i in range(4):
            await a1.sent(message(B, f"m-{i}"))
        await first.wait_entries(4)
        cursor = await first.ack(2)
        assert cursor.cursor.cursor == 2

        second = await rs.connect(r1, f"{B}/b1")  # the same device, on the other replica
        await _replaced(first)
        assert second.opened.cursor == 2 and second.opened.head == 4
        entries = await second.wait_entries(2)
        assert [e.offset for e in entries] == [3, 4]  # unacked entries come again, acked ones don't
        assert _client_ids(entries) == ["m-2", "m-3"]

        await a1.sent(message(B, "m-4"))
        await second.wait_entries(3)
        assert second.offsets() == [3, 4, 5]
        assert (await second.ack(5)).cursor.cursor == 5

        third = await rs.connect(r2, f"{B}/b1")  # and back to replica 2
        await _replaced(second)
        assert third.opened.cursor == 5 and third.opened.head == 5
        await a1.sent(message(B, "m-5"))
        await third.wait_entries(1)
        assert third.offsets() == [6] and _client_ids(third.entries()) == ["m-5"]
        # The replaced streams got nothing after they ended.
        assert first.offsets() == [1, 2, 3, 4]
        assert second.offsets() == [3, 4, 5]
        assert not third.finished
        if backend.redis_url is not None:
            # Replica 1 knows the device is connected (on replica 2): the replaced stream's exit on
            # replica 1 did not erase the newer stream's mark.
            assert await _device_connected(rs, r1, B, "b1")


async def _device_connected(rs: Replicas, channel: grpc.aio.Channel, eid: str, device_id: str) -> bool:
    stub = internal_pb2_grpc.MessagingInternalServiceStub(channel)
    keys = Keys.from_settings(load_settings(CoreSettings, rs.env))
    call = stub.PresenceLink(metadata=ServiceCredentials(keys, "awareness").metadata(), timeout=15)
    online = internal_pb2.DeviceOnline(device=common_pb2.Identity(eid=eid, device_id=device_id))
    await call.write(internal_pb2.PresenceLinkRequest(seq=1, device_online=online))
    answer = await call.read()
    call.cancel()
    assert answer.seq == 1 and answer.HasField("ack"), answer
    return bool(answer.ack.device_connected)


async def test_missed_notice_across_replicas_loses_nothing(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    """X5/M12 (scale only: the in-process bus cannot miss a notice): replica 2's Redis subscriber
    connection is killed while it is paused, and A1 sends through replica 1 meanwhile, so the
    notice is published while nobody on replica 2 listens. B1's stream on replica 2 still gets the
    message (the heartbeat re-reads storage), and later messages still arrive after the reconnect."""
    backend = Backend("scale", postgres_url, redis_url, f"bimip-t-missed-{uuid.uuid4().hex[:8]}")
    async with replicas(backend, tmp_path, BIMIP_HEARTBEAT_INTERVAL_S="0.5") as rs:
        r1, r2 = rs.channel(0), rs.channel(1)
        a1 = await rs.connect(r1, f"{A}/a1")
        b1 = await rs.connect(r2, f"{B}/b1")
        await a1.sent(message(B, "m-0"))
        await b1.wait_entries(1)

        replica2 = rs.processes[1]
        redis_port = urlsplit(redis_url).port or 6379
        client = aioredis.from_url(redis_url)
        try:
            ports = tcp_local_ports(replica2.pid, redis_port)
            subscribers = [
                c
                for c in await client.client_list(_type="pubsub")
                if int(c["addr"].rsplit(":", 1)[1]) in ports
            ]
            assert subscribers, "replica 2 has no Redis subscriber connection"
            replica2.pause()
            try:
                for subscriber in subscribers:
                    assert await client.client_kill_filter(_id=subscriber["id"]) == 1
                missed = await a1.sent(message(B, "m-1"))  # its notice reaches no one on replica 2
            finally:
                replica2.resume()
        finally:
            await client.aclose()

        await b1.wait_entries(2, timeout=10)
        assert b1.offsets() == [1, 2]
        assert b1.entries()[1].message.signal_id == missed.signal_id

        await a1.sent(message(B, "m-2"))
        await b1.wait_entries(3, timeout=10)
        assert b1.offsets() == [1, 2, 3]
        assert _client_ids(b1.entries()) == ["m-0", "m-1", "m-2"]
        assert not b1.finished


async def test_the_same_send_on_both_replicas_at_once_creates_one_message(
    backend: Backend, tmp_path: Path
) -> None:
    """M3 across replicas: each client id is sent through both replicas at the same moment (the
    race the writer resolves by retrying op by op when the other replica took the key first);
    every client id ends as one message, and both acks name it."""
    async with replicas(backend, tmp_path, **NO_HEARTBEAT_RESCUE) as rs:
        r1, r2 = rs.channel(0), rs.channel(1)
        a1 = await rs.connect(r1, f"{A}/a1")
        a2 = await rs.connect(r2, f"{A}/a2")
        b1 = await rs.connect(r1, f"{B}/b1")
        ids = [f"race-{i}" for i in range(20)]
        seqs = []
        for client_id in ids:
            msg = message(B, client_id, client_id.encode())
            seqs.append((await a1.write(send=_send(msg)), await a2.write(send=_send(msg))))
        for client_id, (s1, s2) in zip(ids, seqs, strict=True):
            one, two = (await a1.reply(s1)).sent, (await a2.reply(s2)).sent
            assert (one.signal_id, one.offset) == (two.signal_id, two.offset), client_id
            assert [one.duplicate, two.duplicate].count(True) == 1, client_id
        entries = await b1.wait_entries(20)
        assert _client_ids(entries) and sorted(_client_ids(entries)) == sorted(ids)
        assert [e.offset for e in entries] == list(range(1, 21))


def _send(msg: common_pb2.Message) -> messaging_pb2.SendRequest:
    return messaging_pb2.SendRequest(message=msg)

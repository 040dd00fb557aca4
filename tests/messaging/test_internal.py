"""The internal streams (M11 for awareness, S7 for sync), driven from a test client, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bimip.common.v1 import common_pb2
from bimip.core.auth import ServiceCredentials
from bimip.core.clock import FakeClock
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import devices, message
from tests.suite import Suite, running_suite

A, B = "alice@example.com", "bob@example.com"


def _id(eid: str, device: str = "") -> common_pb2.Identity:
    return common_pb2.Identity(eid=eid, device_id=device)


class Link:
    """One internal stream: write requests, collect responses by seq."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.responses: list[Any] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import grpc

        while (response := await self.call.read()) is not grpc.aio.EOF:
            self.responses.append(response)

    def answers(self, seq: int) -> list[Any]:
        return [r for r in self.responses if r.seq == seq]

    async def ask(self, seq: int, count: int = 1, **request: Any) -> list[Any]:
        await self.call.write(type(self).request_type(seq=seq, **request))
        return await self.wait(seq, count)

    async def wait(self, seq: int, count: int = 1) -> list[Any]:
        await eventually(lambda: len(self.answers(seq)) >= count, timeout=15)
        return self.answers(seq)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class Presence(Link):
    request_type = internal_pb2.PresenceLinkRequest


class Log(Link):
    request_type = internal_pb2.LogLinkRequest


@pytest.fixture
async def suite(backend: Backend, tmp_path: Path) -> AsyncIterator[Suite]:
    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        yield suite


async def _link(suite: Suite, kind: type[Link], channel: Any) -> Any:
    stub = internal_pb2_grpc.MessagingInternalServiceStub(channel)
    metadata = ServiceCredentials(suite.keys, "awareness" if kind is Presence else "sync").metadata()
    rpc = stub.PresenceLink if kind is Presence else stub.LogLink
    return kind(rpc(metadata=metadata))


async def test_device_online_flushes_pending_entries_at_once(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()  # the grace period never passes by itself here
    async with running_suite(backend, tmp_path, ["messaging"], clock=clock) as suite:
        async with suite.channel("messaging") as channel, devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
            await a1.sent(message(B, "pending"))
            await b1.wait_entries(1)
            presence = await _link(suite, Presence, channel)
            try:
                (ack,) = await presence.ask(1, device_online=internal_pb2.DeviceOnline(device=_id(B, "b1")))
                assert ack.ack.device_connected
                await b1.wait_for(lambda: len(b1.deliveries) == 2)
                assert b1.deliveries[1].redelivery and b1.deliveries[1].entry.offset == 1
                (other,) = await presence.ask(2, device_online=internal_pb2.DeviceOnline(device=_id(B, "b9")))
                assert not other.ack.device_connected
                (bad,) = await presence.ask(
                    3, device_online=internal_pb2.DeviceOnline(device=_id("nobody", "x"))
                )
                assert bad.error.reason == "INVALID_EID"
            finally:
                await presence.close()


async def test_resume_replays_a_conversation_without_moving_the_cursor(suite: Suite) -> None:
    async with (
        suite.channel("messaging") as channel,
        devices(suite, f"{A}/a1", f"{B}/b1", "carol@example.com/c1") as (a1, b1, c1),
    ):
        await a1.sent(message(B, "a-1"))
        await b1.sent(message(A, "b-1"))  # B's own entry: part of the conversation's replay
        await c1.sent(message(B, "c-1"))
        await a1.sent(message(B, "a-2"))
        await b1.wait_entries(3)
        await b1.ack(4)
        presence = await _link(suite, Presence, channel)
        try:
            resume = internal_pb2.ResumeConversation(device=_id(B, "b1"), peer_eid=A, after_offset=0)
            (ack,) = await presence.ask(1, resume=resume)
            assert ack.ack.device_connected
            await b1.wait_for(lambda: b1.of("replay_complete"))
            replayed = b1.entries(replay=True)
            assert [e.offset for e in replayed] == [1, 2, 4]
            assert [e.message.client_id for e in replayed] == ["a-1", "b-1", "a-2"]
            assert b1.of("replay_complete")[0].count == 3
            bad = internal_pb2.ResumeConversation(device=_id(B, "b1"), peer_eid=A, after_offset=-1)
            (refused,) = await presence.ask(2, resume=bad)
            assert refused.error.reason == "INVALID_OFFSET"
        finally:
            await presence.close()
        assert (await b1.ack(4)).cursor.cursor == 4  # the replay did not move it


async def test_blocks_refuse_messages_both_ways(suite: Suite) -> None:
    async with suite.channel("messaging") as channel, devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        before = await a1.sent(message(B, "before"))
        presence = await _link(suite, Presence, channel)
        try:
            block = internal_pb2.BlockChange(blocker_eid=B, blocked_eid=A, blocked=True)
            (ack,) = await presence.ask(1, block_change=block)
            assert ack.HasField("ack")
            for device, to in ((a1, B), (b1, A)):
                refused = await device.send(message(to, "blocked"))
                assert (refused.error.code, refused.error.reason) == (7, "BLOCKED")
            # A retry of a message sent before the block is still its original ack.
            assert (await a1.sent(message(B, "before"))).signal_id == before.signal_id
            (entry,) = await b1.wait_entries(1)  # already in the log: still delivered
            assert entry.message.client_id == "before"
            unblock = internal_pb2.BlockChange(blocker_eid=B, blocked_eid=A, blocked=False)
            await presence.ask(2, block_change=unblock)
            assert (await a1.sent(message(B, "after"))).offset == 2
        finally:
            await presence.close()


async def test_log_link_reads_with_credit(suite: Suite) -> None:
    async with suite.channel("messaging") as channel, devices(suite, f"{A}/a1", f"{A}/a2") as (a1, a2):
        for i in range(7):
            await (a1 if i % 2 == 0 else a2).sent(message(B, f"m{i}"))
        log = await _link(suite, Log, channel)
        try:
            read = internal_pb2.ReadLog(reader=_id(A, "a1"), after_offset=0, page_size=2, initial_credit=1)
            (first,) = await log.ask(1, read=read)
            page = first.page
            # a1's own entries (1, 3, 5, 7) are left out for a1; offsets still count them.
            assert [e.offset for e in page.entries] == [2] and page.next_after == 2 and page.more
            assert page.head == 7 and page.first_offset == 1
            await asyncio.sleep(0)  # no more pages without credit
            assert len(log.answers(1)) == 1
            await log.call.write(internal_pb2.LogLinkRequest(seq=1, credit=internal_pb2.ReadCredit(pages=10)))
            pages = await log.wait(1, 4)
            assert [e.offset for p in pages for e in p.page.entries] == [2, 4, 6]
            assert not pages[-1].page.more and pages[-1].page.next_after == 7
            everything = internal_pb2.ReadLog(reader=_id(A), after_offset=5, page_size=10, initial_credit=1)
            (whole,) = await log.ask(2, read=everything)
            assert [e.offset for e in whole.page.entries] == [6, 7]
            for seq, bad, reason in [
                (3, internal_pb2.ReadLog(reader=_id(A), after_offset=8), "SNAPSHOT_REQUIRED"),
                (4, internal_pb2.ReadLog(reader=_id(A), after_offset=-1), "INVALID_OFFSET"),
                (5, internal_pb2.ReadLog(reader=_id(A), page_size=1001), "INVALID_PAGE_SIZE"),
                (6, internal_pb2.ReadLog(reader=_id("bad")), "INVALID_EID"),
            ]:
                (refused,) = await log.ask(seq, read=bad)
                assert refused.error.reason == reason
            (unknown,) = await log.ask(7, credit=internal_pb2.ReadCredit(pages=1))
            assert unknown.error.reason == "UNKNOWN_READ"
            # A reader that has what it wanted ends the read: later credit finds no read.
            partial = internal_pb2.ReadLog(reader=_id(A), after_offset=0, page_size=1, initial_credit=1)
            (one,) = await log.ask(8, read=partial)
            assert one.page.more
            await log.call.write(
                internal_pb2.LogLinkRequest(seq=8, credit=internal_pb2.ReadCredit(cancel=True))
            )
            ended = internal_pb2.LogLinkRequest(seq=8, credit=internal_pb2.ReadCredit(pages=5))
            await log.call.write(ended)
            (_, after_cancel) = await log.wait(8, 2)
            assert after_cancel.error.reason == "UNKNOWN_READ"  # no second page was sent
        finally:
            await log.close()


async def test_log_link_appends_idempotently_and_acks(suite: Suite) -> None:
    async with suite.channel("messaging") as channel, devices(suite, f"{B}/b1") as (b1,):
        log = await _link(suite, Log, channel)
        try:
            batch = [message(B, "o1"), message(B, "", b"bad"), message(B, "o2"), message("nope", "o3")]
            append = internal_pb2.AppendMessages(device=_id(A, "a1"), messages=batch)
            (result,) = await log.ask(1, append=append)
            outcomes = [(r.client_id, r.WhichOneof("outcome")) for r in result.appended.results]
            assert outcomes == [("o1", "ack"), ("", "error"), ("o2", "ack"), ("o3", "error")]
            assert [r.ack.offset for r in result.appended.results if r.HasField("ack")] == [1, 2]
            assert result.appended.head == 2
            (again,) = await log.ask(
                2, append=internal_pb2.AppendMessages(device=_id(A, "a1"), messages=batch[:1])
            )
            assert again.appended.results[0].ack.duplicate
            await b1.wait_entries(2)
            (cursor,) = await log.ask(3, ack=internal_pb2.AckLog(device=_id(B, "b1"), offset=2))
            assert cursor.cursor.cursor == 2
            # The live stream of that device hears of it: nothing is redelivered from before 2.
            (beyond,) = await log.ask(4, ack=internal_pb2.AckLog(device=_id(B, "b1"), offset=3))
            assert beyond.error.reason == "ACK_BEYOND_HEAD"
            (listed,) = await log.ask(5, list_devices=internal_pb2.ListDevices(eid=B))
            assert [(d.device_id, d.cursor) for d in listed.devices.devices] == [("b1", 2)]
            too_many = internal_pb2.AppendMessages(device=_id(A, "a1"), messages=[message(B, "x")] * 1001)
            (refused,) = await log.ask(6, append=too_many)
            assert refused.error.reason == "BATCH_TOO_LARGE"
            (empty,) = await log.ask(7)
            assert empty.error.reason == "FRAME_EMPTY"
        finally:
            await log.close()


async def test_a_link_to_several_replicas_balances_round_robin(backend: Backend, tmp_path: Path) -> None:
    """The internal links keep a connection to every address the messaging target resolves to
    (round_robin), not only to the first (gRPC's default, pick_first)."""
    import os

    from bimip.core.clock import SystemClock
    from bimip.core.config import load_settings
    from bimip.core.server import start_service
    from services.links import PresenceLink
    from services.messaging.app import build as build_messaging
    from services.messaging.config import MessagingSettings
    from tests.processes import tcp_local_ports
    from tests.suite import suite_env

    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        first = suite.services["messaging"]
        settings = load_settings(
            MessagingSettings, {**suite_env(backend, tmp_path), "BIMIP_REPLICA_ID": "r2"}
        )
        second = await start_service("messaging", build_messaging, suite.shared, settings)
        link = PresenceLink(
            f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}",
            ServiceCredentials(suite.keys, "awareness"),
            first.runtime.telemetry,
            SystemClock(),
        )
        try:
            answer = await link.send(heartbeat=common_pb2.Heartbeat())
            assert answer.WhichOneof("result") == "heartbeat"
            await eventually(
                lambda: all(tcp_local_ports(os.getpid(), p) for p in (first.port, second.port)), timeout=10
            )
        finally:
            await link.close()
            await second.stop(grace=0.5)

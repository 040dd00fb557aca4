"""Acks, statuses, marks, commands, the window and the commit offset (M4–M10, M12), on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bimip.common.v1 import common_pb2
from bimip.core.clock import FakeClock
from bimip.core.errors import reason_of
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from tests.conftest import Backend
from tests.messaging_client import connect, devices, message
from tests.suite import SLOW_TIMERS, Suite, running_suite

A, B = "alice@example.com", "bob@example.com"
SENT, DELIVERED = common_pb2.DELIVERY_STATUS_SENT, common_pb2.DELIVERY_STATUS_DELIVERED
READ, PLAYED = common_pb2.DELIVERY_STATUS_READ, common_pb2.DELIVERY_STATUS_PLAYED
EDIT = common_pb2.COMMAND_KIND_EDIT
DELETE_ALL = common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE
DELETE_ME = common_pb2.COMMAND_KIND_DELETE_FOR_ME


@pytest.fixture
async def suite(backend: Backend, tmp_path: Path) -> AsyncIterator[Suite]:
    async with running_suite(backend, tmp_path, ["messaging"], BIMIP_WINDOW="4") as suite:
        yield suite


def _auth(suite: Suite, eid: str, device: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {suite.token(eid, device)}"),)


async def _status(suite: Suite, eid: str, signal_id: str) -> messaging_pb2.GetMessageStatusResponse:
    async with suite.channel("messaging") as channel:
        return await messaging_pb2_grpc.MessagingServiceStub(channel).GetMessageStatus(  # type: ignore[no-any-return]
            messaging_pb2.GetMessageStatusRequest(signal_id=signal_id), metadata=_auth(suite, eid, "q")
        )


async def test_acks_move_the_cursor_forward_only(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        for i in range(3):
            await a1.sent(message(B, f"m{i}"))
        await b1.wait_entries(3)
        beyond = await b1.ack(4)
        assert beyond.error.code == grpc.StatusCode.OUT_OF_RANGE.value[0]
        assert beyond.error.reason == "ACK_BEYOND_DELIVERED"
        assert (await b1.ack(2)).cursor.cursor == 2
        assert (await b1.ack(1)).cursor.cursor == 2  # below the cursor: a harmless no-op
        negative = await b1.ack(-1)
        assert negative.error.reason == "INVALID_OFFSET"
        assert (await b1.ack(3)).cursor.cursor == 3


async def test_own_entries_are_passed_over_and_may_be_acked(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        await b1.sent(message(A, "from-b"))  # A's offset 1
        own = [await a1.sent(message(B, f"own{i}")) for i in range(2)]  # A's offsets 2, 3
        assert [a.offset for a in own] == [2, 3]
        (entry,) = await a1.wait_entries(1)
        assert entry.offset == 1
        # Acking its own later entry covers the entry it was sent before it, too.
        assert (await a1.ack(3)).cursor.cursor == 3
    async with suite.channel("messaging") as channel:
        again = await connect(channel, suite.token(A, "a1"), A, "a1")
        try:
            assert again.opened.cursor == 3
        finally:
            await again.close()


async def test_own_entries_alone_move_the_cursor_without_an_ack(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1") as (a1,):
        await a1.sent(message(B, "m1"))
        await a1.sent(message(B, "m2"))
        await a1.wait_for(lambda: [c.cursor for c in a1.of("cursor")][-1:] == [2])
        assert not a1.entries()


async def test_window_bounds_in_flight_and_a_slow_device_loses_nothing(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        for i in range(10):
            await a1.sent(message(B, f"w{i}"))
        await b1.wait_entries(4)
        # The window (4 here) is full: nothing more until an ack, however long it takes.
        extra = await a1.sent(message(B, "w10"))
        assert extra.offset == 11
        assert len(b1.entries()) == 4
        await b1.ack(4)
        await b1.wait_entries(8)
        await b1.ack(8)
        await b1.wait_entries(11)
        assert [e.offset for e in b1.entries()] == list(range(1, 12))


async def test_statuses_per_device_aggregate_never_backward(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1", f"{B}/b2") as (a1, b1, b2):
        ack = await a1.sent(message(B, "s1"))
        status = await _status(suite, A, ack.signal_id)
        assert status.aggregate == SENT and not status.devices
        assert status.sender.eid == A and status.recipient.eid == B and status.client_id == "s1"
        await b1.wait_entries(1)
        await b2.wait_entries(1)
        played = await b1.mark(PLAYED, signal_id=ack.signal_id)
        assert played.marked.updated == 1
        await b2.ack(1)  # DELIVERED by b2 after PLAYED by b1: the aggregate stays PLAYED
        await b2.wait_for(lambda: b2.of("cursor"))
        status = await _status(suite, B, ack.signal_id)
        assert status.aggregate == PLAYED
        assert status.HasField("delivered_at") and status.HasField("read_at") and status.HasField("played_at")
        per_device = {d.device.device_id: d for d in status.devices}
        assert per_device["b1"].status == PLAYED and per_device["b1"].HasField("read_at")
        assert per_device["b2"].status == DELIVERED and not per_device["b2"].HasField("read_at")
        # One receipt of the highest status (PLAYED implies READ), no later DELIVERED receipt.
        await a1.wait_for(lambda: [r.status for r in a1.receipts()] == [PLAYED])
        # The reader's other device learns it once.
        await b2.wait_for(lambda: [r.status for r in b2.receipts()] == [PLAYED])
        again = await b1.mark(READ, signal_id=ack.signal_id)
        assert again.marked.updated == 0  # repeats are no-ops
        # Only the message's two users may ask.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _status(suite, "carol@example.com", ack.signal_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and reason_of(err.value) == "MESSAGE_NOT_FOUND"


async def test_mark_read_up_to_offset_from_one_peer(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1", "carol@example.com/c1") as (a1, b1, c1):
        acks = [await a1.sent(message(B, f"r{i}")) for i in range(3)]
        from_carol = await c1.sent(message(B, "c"))
        await b1.wait_entries(4)
        beyond = await b1.mark(READ, peer_range=messaging_pb2.PeerRange(peer_eid=A, up_to_offset=5))
        assert (
            beyond.error.code == grpc.StatusCode.OUT_OF_RANGE.value[0]
            and beyond.error.reason == "NOT_RECEIVED"
        )
        result = await b1.mark(READ, peer_range=messaging_pb2.PeerRange(peer_eid=A, up_to_offset=2))
        assert result.marked.updated == 2
        assert [(await _status(suite, A, a.signal_id)).aggregate for a in acks] == [READ, READ, SENT]
        assert (await _status(suite, B, from_carol.signal_id)).aggregate == SENT


async def test_bad_marks(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1", f"{B}/b2") as (a1, b1, b2):
        mine = await b1.sent(message(A, "mine"))
        for_b2 = await a1.sent(message(B, "private", device="b2"))
        await b2.wait_entries(1)
        cases = [
            (dict(status=DELIVERED, signal_id=mine.signal_id), "INVALID_STATUS"),
            (dict(status=7, signal_id=mine.signal_id), "INVALID_STATUS"),
            (dict(status=READ), "TARGET_REQUIRED"),
            (dict(status=READ, signal_id=mine.signal_id), "MESSAGE_NOT_FOUND"),  # one's own message
            (dict(status=READ, signal_id="01NOSUCHMESSAGE0000000000"), "MESSAGE_NOT_FOUND"),
            (dict(status=READ, signal_id=for_b2.signal_id), "MESSAGE_NOT_FOUND"),  # never sent to b1
            (
                dict(status=READ, peer_range=messaging_pb2.PeerRange(peer_eid="nope", up_to_offset=1)),
                "INVALID_EID",
            ),
        ]
        for fields, reason in cases:
            status = fields.pop("status")
            response = await b1.mark(status, **fields)
            assert response.error.reason == reason, (fields, response)
        # Not received yet: b1's window (4) is full of other entries, the fifth is not sent.
        late = [await a1.sent(message(B, f"late{i}")) for i in range(5)]
        await b1.wait_entries(4)
        not_yet = await b1.mark(READ, signal_id=late[-1].signal_id)
        assert not_yet.error.reason == "NOT_RECEIVED"


async def test_edit_and_delete_commands(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{A}/a2", f"{B}/b1") as (a1, a2, b1):
        ack = await a1.sent(message(B, "orig", b"v1"))
        clock = common_pb2.HybridLogicalClock
        edit = await a1.command(
            signal_id=ack.signal_id, kind=EDIT, clock=clock(wall_time_ms=1000), payload=b"v2"
        )
        assert edit.command_result.signal_id == ack.signal_id and edit.command_result.offset == 2
        # A concurrent edit with an older clock loses; an equal clock resolves by the greater device id.
        older = await a2.command(
            signal_id=ack.signal_id, kind=EDIT, clock=clock(wall_time_ms=999), payload=b"old"
        )
        assert older.error.reason == "EDIT_SUPERSEDED"
        tie = await a2.command(
            signal_id=ack.signal_id, kind=EDIT, clock=clock(wall_time_ms=1000), payload=b"a2"
        )
        assert tie.command_result.offset == 3  # "a2" > "a1"
        # Only the sender edits or deletes for everyone.
        theirs = await b1.command(
            signal_id=ack.signal_id, kind=EDIT, clock=clock(wall_time_ms=5000), payload=b"x"
        )
        assert (theirs.error.code, theirs.error.reason) == (
            grpc.StatusCode.PERMISSION_DENIED.value[0],
            "NOT_SENDER",
        )
        # Either user deletes for themself: only their own log gets it.
        mine = await b1.command(signal_id=ack.signal_id, kind=DELETE_ME, clock=clock(wall_time_ms=5000))
        assert mine.command_result.offset > 0
        gone = await a1.command(signal_id=ack.signal_id, kind=DELETE_ALL, clock=clock(wall_time_ms=2000))
        assert gone.command_result.offset > 0
        late = await a2.command(
            signal_id=ack.signal_id, kind=EDIT, clock=clock(wall_time_ms=9000), payload=b"v9"
        )
        assert (late.error.code, late.error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION.value[0],
            "MESSAGE_DELETED",
        )
        # Replicated through the logs: B1 sees message, both winning edits, delete-for-everyone.
        await b1.wait_for(lambda: len(b1.entries()) == 4)
        kinds = [(e.WhichOneof("body"), e.command.kind if e.HasField("command") else 0) for e in b1.entries()]
        assert kinds == [("message", 0), ("command", EDIT), ("command", EDIT), ("command", DELETE_ALL)]
        assert [e.command.payload for e in b1.entries()[1:3]] == [b"v2", b"a2"]
        # A2 sees the mirror, A1's edit and delete (not its own edit, not B's delete-for-me).
        await a2.wait_for(lambda: len(a2.entries()) == 3)
        assert [e.command.kind for e in a2.entries()[1:]] == [EDIT, DELETE_ALL]


async def test_bad_commands(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1") as (a1,):
        ack = await a1.sent(message(B, "m"))
        clock = common_pb2.HybridLogicalClock(wall_time_ms=1)
        cases = [
            (dict(signal_id="", kind=EDIT, clock=clock, payload=b"x"), "INVALID_SIGNAL_ID"),
            (dict(signal_id=ack.signal_id, kind=0, clock=clock), "INVALID_COMMAND_KIND"),
            (dict(signal_id=ack.signal_id, kind=9, clock=clock), "INVALID_COMMAND_KIND"),
            (dict(signal_id=ack.signal_id, kind=EDIT, payload=b"x"), "INVALID_CLOCK"),
            (dict(signal_id=ack.signal_id, kind=EDIT, clock=clock), "PAYLOAD_REQUIRED"),
            (
                dict(signal_id=ack.signal_id, kind=EDIT, clock=clock, payload=b"x" * 70_000),
                "PAYLOAD_TOO_LARGE",
            ),
            (dict(signal_id="01NOSUCHMESSAGE0000000000", kind=DELETE_ME, clock=clock), "MESSAGE_NOT_FOUND"),
        ]
        for fields, reason in cases:
            response = await a1.command(**fields)
            assert response.error.reason == reason, (fields, response)
    async with devices(suite, "carol@example.com/c1") as (c1,):
        outsider = await c1.command(signal_id=ack.signal_id, kind=DELETE_ME, clock=clock)
        assert outsider.error.reason == "MESSAGE_NOT_FOUND"


async def test_commit_offset_is_the_minimum_over_active_devices(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_suite(
        backend, tmp_path, ["messaging"], clock=clock, BIMIP_DEVICE_RETENTION_DAYS="30", **SLOW_TIMERS
    ) as suite:
        async with devices(suite, f"{A}/a1", f"{B}/b1", f"{B}/b2") as (a1, b1, b2):
            for i in range(3):
                await a1.sent(message(B, f"m{i}"))
            await b1.wait_entries(3)
            await b1.ack(3)
            await b2.wait_entries(3)
            await b2.ack(1)
            async with suite.channel("messaging") as channel:
                stub = messaging_pb2_grpc.MessagingServiceStub(channel)
                report = await stub.GetCommitOffset(
                    messaging_pb2.GetCommitOffsetRequest(), metadata=_auth(suite, B, "b1")
                )
            assert report.head == 3 and report.commit_offset == 1
            assert {(d.device_id, d.cursor, d.active) for d in report.devices} == {
                ("b1", 3, True),
                ("b2", 1, True),
            }
        # b1 is seen 20 days later, b2 not: 31 days on, b2 no longer holds the bound.
        await clock.advance(20 * 86400)
        async with suite.channel("messaging") as channel:
            stub = messaging_pb2_grpc.MessagingServiceStub(channel)
            await stub.GetCommitOffset(messaging_pb2.GetCommitOffsetRequest(), metadata=_auth(suite, B, "b1"))
            await clock.advance(11 * 86400)
            report = await stub.GetCommitOffset(
                messaging_pb2.GetCommitOffsetRequest(), metadata=_auth(suite, B, "b1")
            )
            assert report.commit_offset == 3
            assert {(d.device_id, d.active) for d in report.devices} == {("b1", True), ("b2", False)}
            # The long-gone device is told to resynchronise, once; then it starts afresh.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await connect(channel, suite.token(B, "b2"), B, "b2")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(err.value) == "RESYNC_REQUIRED"
            fresh = await connect(channel, suite.token(B, "b2"), B, "b2")
            try:
                assert fresh.opened.cursor == 0
                await fresh.wait_entries(3)
            finally:
                await fresh.close()


async def test_a_stalled_device_holds_back_no_other_device(suite: Suite) -> None:
    """M6, M12: B1 never acks and its window (4) stays full; B2 and A2 get everything meanwhile."""
    async with devices(suite, f"{A}/a1", f"{A}/a2", f"{B}/b1", f"{B}/b2") as (a1, a2, b1, b2):
        for i in range(12):
            await a1.sent(message(B, f"s{i}"))
            if b2.entries():
                await b2.ack(b2.entries()[-1].offset)
            if a2.entries():
                await a2.ack(a2.entries()[-1].offset)
        await b2.wait_for(lambda: len(b2.entries()) == 12)
        await b2.ack(12)
        await a2.wait_for(lambda: len([e for e in a2.entries() if e.HasField("message")]) == 12)
        assert len(b1.entries()) == 4  # lagging, not dropped: the rest waits for its acks
        await b1.ack(4)
        await b1.wait_for(lambda: len(b1.entries()) == 8)
        assert [e.offset for e in b1.entries()] == list(range(1, 9))

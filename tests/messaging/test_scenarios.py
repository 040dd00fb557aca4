"""SPEC public scenarios 1, 2, 3 and 4 (and 7 in test_replicas.py), on both backends."""

from __future__ import annotations

from pathlib import Path

from bimip.common.v1 import common_pb2
from bimip.core.clock import FakeClock
from tests.conftest import Backend
from tests.messaging_client import connect, devices, message
from tests.suite import running_suite

A, B = "alice@example.com", "bob@example.com"
DELIVERED = common_pb2.DELIVERY_STATUS_DELIVERED
READ = common_pb2.DELIVERY_STATUS_READ


async def test_scenario_1_status_lifecycle_across_devices(backend: Backend, tmp_path: Path) -> None:
    """A1 sends to B while B1 is online and B2 offline: SENT; B1 gets it and acks; A1 and A2 get
    DELIVERED; B2 comes online and gets it; B1 marks READ; A1, A2 and B2 learn READ."""
    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        async with suite.channel("messaging") as channel:
            b2 = await connect(channel, suite.token(B, "b2"), B, "b2")  # B2 known, then offline
            await b2.close()
            async with devices(suite, f"{A}/a1", f"{A}/a2", f"{B}/b1", channel=channel) as (a1, a2, b1):
                ack = await a1.sent(message(B, "m-1", b"hello"))
                assert ack.status == common_pb2.DELIVERY_STATUS_SENT and ack.signal_id and ack.offset == 1
                assert not ack.duplicate

                (entry,) = await b1.wait_entries(1)
                assert entry.message.payload == b"hello" and entry.message.signal_id == ack.signal_id
                assert entry.message.sender.eid == A and entry.message.sender.device_id == "a1"
                assert entry.peer_eid == A
                await b1.ack(entry.offset)

                for sender_device in (a1, a2):
                    await sender_device.wait_for(
                        lambda d=sender_device: [r.status for r in d.receipts()] == [DELIVERED]
                    )
                assert a1.receipts()[0].signal_id == ack.signal_id
                assert a1.receipts()[0].by.device_id == "b1"
                # A2 got the mirror copy of the message first; A1 never gets its own message back.
                assert [e.WhichOneof("body") for e in a2.entries()] == ["message", "receipt"]
                assert [e.WhichOneof("body") for e in a1.entries()] == ["receipt"]

                b2 = await connect(channel, suite.token(B, "b2"), B, "b2")
                try:
                    (again,) = await b2.wait_entries(1)
                    assert again.message.signal_id == ack.signal_id
                    marked = await b1.mark(READ, signal_id=ack.signal_id)
                    assert marked.marked.updated == 1
                    for d in (a1, a2):
                        await d.wait_for(lambda d=d: [r.status for r in d.receipts()] == [DELIVERED, READ])
                    # B2 learns B1 read it (the first READ goes to the reader's own log too).
                    await b2.wait_for(lambda: [r.status for r in b2.receipts()] == [READ])
                    assert not b1.receipts()  # B1 wrote that receipt: not sent back to it
                finally:
                    await b2.close()


async def test_scenario_2_mirror_to_senders_other_device(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        async with devices(suite, f"{A}/a1", f"{A}/a2") as (a1, a2):
            ack = await a1.sent(message(B, "m-1"))
            (mirror,) = await a2.wait_entries(1)
            assert mirror.message.signal_id == ack.signal_id and mirror.offset == ack.offset
            cursor = await a2.ack(mirror.offset)
            assert cursor.cursor.cursor == mirror.offset
            await a1.sent(message(B, "m-2"))
            await a2.wait_entries(2)
            assert [e.message.client_id for e in a2.entries()] == ["m-1", "m-2"]
            assert not a1.entries()


async def test_scenario_3_offline_device_catches_up_in_order(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        async with suite.channel("messaging") as channel:
            b1 = await connect(channel, suite.token(B, "b1"), B, "b1")
            await b1.close()
            async with devices(suite, f"{A}/a1", channel=channel) as (a1,):
                for i in range(5):
                    await a1.sent(message(B, f"m-{i}", f"{i}".encode()))
            b1 = await connect(channel, suite.token(B, "b1"), B, "b1")
            try:
                assert b1.opened.cursor == 0 and b1.opened.head == 5
                entries = await b1.wait_entries(5)
                assert [e.offset for e in entries] == [1, 2, 3, 4, 5]
                assert [e.message.payload for e in entries] == [b"0", b"1", b"2", b"3", b"4"]
                cursor = await b1.ack(5)
                assert cursor.cursor.cursor == 5
            finally:
                await b1.close()
            b1 = await connect(channel, suite.token(B, "b1"), B, "b1")
            try:
                assert b1.opened.cursor == b1.opened.head == 5
            finally:
                await b1.close()


async def test_scenario_4_grace_redelivery(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_suite(
        backend, tmp_path, ["messaging"], clock=clock, BIMIP_GRACE_PERIOD_S="30"
    ) as suite:
        async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
            await a1.sent(message(B, "m-1"))
            await a1.sent(message(B, "m-2"))
            await b1.wait_entries(2)
            assert not any(d.redelivery for d in b1.deliveries)
            await clock.advance(29)
            assert len(b1.deliveries) == 2
            await clock.advance(2)
            await b1.wait_for(lambda: len(b1.deliveries) == 4)
            again = b1.deliveries[2:]
            assert [d.entry.offset for d in again] == [1, 2] and all(d.redelivery for d in again)
            await b1.ack(2)
            await clock.advance(120)
            await a1.sent(message(B, "m-3"))  # something new still flows
            await b1.wait_for(lambda: len(b1.deliveries) == 5)
            assert b1.deliveries[-1].entry.offset == 3 and not b1.deliveries[-1].redelivery

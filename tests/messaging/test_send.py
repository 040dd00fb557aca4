"""Sending (M1–M4, X2, X3): idempotency, addressing, and every refused input, on both backends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from bimip.common.v1 import common_pb2
from bimip.core.errors import reason_of
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import connect, devices, message
from tests.suite import SLOW_TIMERS, Suite, running_suite

A, B = "alice@example.com", "bob@example.com"


@pytest.fixture
async def suite(backend: Backend, tmp_path: Path) -> Any:
    async with running_suite(
        backend, tmp_path, ["messaging"], BIMIP_SEND_RATE="5", BIMIP_SEND_BURST="40", BIMIP_MAX_DEVICES="4"
    ) as suite:
        yield suite


def _auth(suite: Suite, eid: str, device: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {suite.token(eid, device)}"),)


async def test_retry_from_same_and_other_device_creates_one_message(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{A}/a2", f"{B}/b1") as (a1, a2, b1):
        first = await a1.sent(message(B, "retry-1", b"x"))
        again = await a1.sent(message(B, "retry-1", b"x"))
        other = await a2.sent(message(B, "retry-1", b"x"))
        async with suite.channel("messaging") as channel:
            unary = await messaging_pb2_grpc.MessagingServiceStub(channel).SendMessage(
                messaging_pb2.SendMessageRequest(message=message(B, "retry-1", b"x")),
                metadata=_auth(suite, A, "a3"),
            )
        for ack in (again, other, unary.ack):
            assert ack.duplicate
            assert (ack.signal_id, ack.offset, ack.server_time) == (
                first.signal_id,
                first.offset,
                first.server_time,
            )
        assert not first.duplicate
        await b1.wait_entries(1)
        # Nothing else arrives: a new message is the next thing B1 sees, at the next offset.
        await a1.sent(message(B, "retry-2"))
        entries = await b1.wait_entries(2)
        assert [e.message.client_id for e in entries] == ["retry-1", "retry-2"] and [
            e.offset for e in entries
        ] == [1, 2]
        # Client ids of different users never collide.
        theirs = await b1.sent(message(A, "retry-1", b"x"))
        assert not theirs.duplicate and theirs.signal_id != first.signal_id


async def test_client_id_reused_for_other_content_is_refused(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1") as (a1,):
        await a1.sent(message(B, "c-1", b"x"))
        variants = [
            message("carol@example.com", "c-1", b"x"),
            message(B, "c-1", b"y"),
            message(B, "c-1", b"x", device="b2"),
            message(B, "c-1", b"x", type=common_pb2.MESSAGE_TYPE_PUSH_NOTIFICATION),
            message(B, "c-1", b"x", encryption_type="olm"),
            message(B, "c-1", b"x", signature=b"sig"),
        ]
        for variant in variants:
            response = await a1.send(variant)
            assert response.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0], variant
            assert response.error.reason == "CLIENT_ID_REUSED"
        # The stream goes on, and nothing consumed an offset.
        ack = await a1.sent(message(B, "c-2"))
        assert ack.offset == 2


async def test_end_to_end_fields_are_forwarded_byte_for_byte(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        raw = bytes(range(256))
        await a1.sent(message(B, "e2e", b"", encryption_type="signal-v3", encrypted=raw, signature=raw[::-1]))
        (entry,) = await b1.wait_entries(1)
        m = entry.message
        assert (m.encryption_type, m.encrypted, m.signature, m.payload) == ("signal-v3", raw, raw[::-1], b"")


async def test_message_to_one_device_reaches_only_it(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{A}/a2", f"{B}/b1", f"{B}/b2") as (a1, a2, b1, b2):
        await a1.sent(message(B, "to-b2", device="b2"))
        await a1.sent(message(B, "to-all"))
        await b2.wait_entries(2)
        await b1.wait_entries(1)
        assert [e.message.client_id for e in b2.entries()] == ["to-b2", "to-all"]
        await b1.ack(2)  # B1 passes over the entry for B2 (offset 1) with its ack of offset 2
        assert [e.message.client_id for e in b1.entries()] == ["to-all"]
        # The sender's other device gets the mirror of both.
        await a2.wait_entries(2)
        assert [e.message.client_id for e in a2.entries()[:2]] == ["to-b2", "to-all"]


async def test_note_to_self_is_one_entry_seen_by_other_devices(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{A}/a2") as (a1, a2):
        ack = await a1.sent(message(A, "self"))
        (entry,) = await a2.wait_entries(1)
        assert entry.offset == ack.offset == 1 and entry.peer_eid == A


async def _refused(device: Any, msg: common_pb2.Message, code: grpc.StatusCode, reason: str) -> None:
    response = await device.send(msg)
    assert response.WhichOneof("frame") == "error", response
    assert (response.error.code, response.error.reason) == (code.value[0], reason), response


async def test_bad_messages_are_refused_one_by_one(suite: Suite) -> None:
    inv = grpc.StatusCode.INVALID_ARGUMENT
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        cases = [
            (message(B, "", b"x"), "CLIENT_ID_REQUIRED"),
            (message(B, "c" * 129, b"x"), "CLIENT_ID_TOO_LONG"),
            (message(B, "p0", b""), "PAYLOAD_REQUIRED"),
            (message(B, "p1", b"x" * (64 * 1024 + 1)), "PAYLOAD_TOO_LARGE"),
            (
                message(B, "p2", b"x" * 60_000, encrypted=b"e" * 5_000, signature=b"s" * 1_000),
                "PAYLOAD_TOO_LARGE",
            ),
            (message("bob", "r1"), "INVALID_RECIPIENT"),
            (message("", "r2"), "INVALID_RECIPIENT"),
            (message("a@b@c", "r3"), "INVALID_RECIPIENT"),
            (message("x" * 250 + "@example.com", "r4"), "INVALID_RECIPIENT"),
            (message(B, "r5", device="has space"), "INVALID_RECIPIENT"),
            (message(B, "t1", type=common_pb2.MESSAGE_TYPE_UNSPECIFIED), "INVALID_MESSAGE_TYPE"),
            (message(B, "t2", type=7), "INVALID_MESSAGE_TYPE"),  # type: ignore[arg-type]
            (message(B, "e1", encryption_type="x" * 65), "INVALID_ENCRYPTION_TYPE"),
        ]
        for msg, reason in cases:
            await _refused(a1, msg, inv, reason)
        # Exactly at the limit is fine; the stream goes on; nothing consumed an offset.
        ack = await a1.sent(message(B, "ok", b"x" * (64 * 1024)))
        assert ack.offset == 1
        (entry,) = await b1.wait_entries(1)
        assert entry.message.client_id == "ok"


async def test_sender_is_the_caller_never_the_field(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        forged = message(B, "forged")
        forged.sender.CopyFrom(common_pb2.Identity(eid="mallory@example.com", device_id="m1"))
        forged.signal_id = "01FORGEDFORGEDFORGEDFORGED"
        ack = await a1.sent(forged)
        (entry,) = await b1.wait_entries(1)
        assert entry.message.sender.eid == A and entry.message.sender.device_id == "a1"
        assert entry.message.signal_id == ack.signal_id != forged.signal_id


async def test_unary_send_refusals_carry_status_and_reason(suite: Suite) -> None:
    async with suite.channel("messaging") as channel:
        stub = messaging_pb2_grpc.MessagingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SendMessage(
                messaging_pb2.SendMessageRequest(message=message(B, "", b"x")), metadata=_auth(suite, A, "a1")
            )
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and reason_of(err.value) == "CLIENT_ID_REQUIRED"
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SendMessage(messaging_pb2.SendMessageRequest(message=message(B, "u1")))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.SendMessage(
            messaging_pb2.SendMessageRequest(message=message(B, "u1")), metadata=_auth(suite, A, "a1")
        )
        assert ok.ack.offset == 1


async def test_rate_limit_refuses_beyond_the_burst(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1", f"{A}/a2") as (a1, a2):
        seqs = [
            await a1.write(send=messaging_pb2.SendRequest(message=message(B, f"r-{i}"))) for i in range(45)
        ]
        answers = [await a1.reply(s) for s in seqs]
        kinds = [a.WhichOneof("frame") for a in answers]
        assert kinds.count("sent") >= 40 and kinds.count("error") >= 1
        refused = [a.error for a in answers if a.WhichOneof("frame") == "error"]
        assert {(e.code, e.reason) for e in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "RATE_LIMITED")
        }
        # Per device: another device of the same user is not limited by it.
        assert (await a2.sent(message(B, "other-device"))).offset > 0


async def test_too_many_devices(suite: Suite) -> None:
    async with suite.channel("messaging") as channel:
        opened = [await connect(channel, suite.token(A, f"d{i}"), A, f"d{i}") for i in range(4)]
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await connect(channel, suite.token(A, "d5"), A, "d5")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(err.value) == "TOO_MANY_DEVICES"
            again = await connect(channel, suite.token(A, "d0"), A, "d0")  # a known device is fine
            await again.close()
        finally:
            for device in opened:
                await device.close()


async def test_stream_protocol_errors(suite: Suite) -> None:
    async with suite.channel("messaging") as channel:
        stub = messaging_pb2_grpc.MessagingServiceStub(channel)
        call = stub.Connect(metadata=_auth(suite, A, "a1"))
        await call.write(messaging_pb2.ConnectRequest(seq=1, ack=messaging_pb2.AckRequest(offset=1)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and reason_of(err.value) == "OPEN_REQUIRED"
        )

        call = stub.Connect(metadata=_auth(suite, A, "a1"))
        await call.write(messaging_pb2.ConnectRequest(open=messaging_pb2.OpenRequest(processed_offset=-1)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason_of(err.value) == "INVALID_OFFSET"
        )

        call = stub.Connect(metadata=_auth(suite, A, "a1"))
        await call.write(messaging_pb2.ConnectRequest(open=messaging_pb2.OpenRequest(processed_offset=5)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and reason_of(err.value) == "ACK_BEYOND_HEAD"

    async with devices(suite, f"{A}/a1") as (a1,):
        again = await a1.reply(await a1.write(open=messaging_pb2.OpenRequest()))
        assert again.error.reason == "ALREADY_OPEN"
        empty = await a1.reply(await a1.write())
        assert empty.error.reason == "FRAME_EMPTY"
        assert (await a1.sent(message(B, "still-fine"))).offset == 1


async def test_frames_after_replacement_are_not_processed(suite: Suite) -> None:
    async with suite.channel("messaging") as channel:
        old = await connect(channel, suite.token(A, "a1"), A, "a1")
        new = await connect(channel, suite.token(A, "a1"), A, "a1")
        try:
            await old.wait_for(lambda: old.finished)
            assert old.ended is not None and old.ended.code() == grpc.StatusCode.ABORTED
            assert reason_of(old.ended) == "CONNECTED_ELSEWHERE"
            with pytest.raises(asyncio.InvalidStateError):  # the call is over: gRPC refuses the write
                await old.write(send=messaging_pb2.SendRequest(message=message(B, "late")))
            ack = await new.sent(message(B, "after"))
            assert ack.offset == 1  # the late frame wrote nothing
        finally:
            await old.close()
            await new.close()


async def test_a_stream_without_open_is_closed(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging"], BIMIP_HEARTBEAT_INTERVAL_S="0.1") as suite:
        async with suite.channel("messaging") as channel:
            call = messaging_pb2_grpc.MessagingServiceStub(channel).Connect(metadata=_auth(suite, A, "a1"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert reason_of(err.value) == "OPEN_REQUIRED"


async def test_client_ids_are_idempotent_for_the_dedupe_window_only(backend: Backend, tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from bimip.core.clock import FakeClock
    from services.messaging import store

    clock = FakeClock()
    async with running_suite(
        backend, tmp_path, ["messaging"], clock=clock, BIMIP_DEDUPE_WINDOW_S="3600", **SLOW_TIMERS
    ) as suite:
        engine = suite.services["messaging"].runtime.engine

        async def purged() -> bool:
            # Each poll moves time on by one purge interval: the purger runs whenever it gets there.
            await clock.advance(900)
            async with engine.connect() as conn:
                return (await conn.execute(select(func.count()).select_from(store.sends))).scalar_one() == 0

        async with devices(suite, f"{A}/a1") as (a1,):
            first = await a1.sent(message(B, "once", b"x"))
            await clock.advance(3000)
            assert (await a1.sent(message(B, "once", b"x"))).duplicate  # within the window
        # Past the window and the next purge (every quarter window), the key is gone and the client
        # id is free again: a new message.
        await clock.advance(1000)
        await eventually(purged)
        async with devices(suite, f"{A}/a1") as (a1,):
            again = await a1.sent(message(B, "once", b"other content is fine now"))
            assert not again.duplicate and again.signal_id != first.signal_id and again.offset == 2

"""`take_batch`: consecutive delivery frames packed into one `deliveries` frame that parses as the
proto says, bounded by count and bytes, never across a frame of another kind."""

from __future__ import annotations

import grpc
import pytest

from bimip.common.v1 import common_pb2
from bimip.core.aio import Mailbox
from bimip.core.streams import add_accepting_serialized, serialize_or_pass
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from bimip.sdk.frames import deliveries_in
from services.messaging.delivery import BATCH_BYTES, Closed, take_batch

Frame = messaging_pb2.ConnectResponse


def delivery(offset: int, payload: bytes = b"x", *, redelivery: bool = False) -> Frame:
    frame = Frame(delivery=messaging_pb2.Delivery(redelivery=redelivery))
    frame.delivery.entry.offset = offset
    frame.delivery.entry.message.payload = payload
    frame.trace_context["traceparent"] = f"00-{offset:032x}-{offset:016x}-01"
    return frame


def queued(*frames: Frame | Closed) -> Mailbox[Frame | Closed]:
    box: Mailbox[Frame | Closed] = Mailbox()
    for frame in frames:
        box.put_nowait(frame)
    return box


def unpacked(packed: Frame | bytes) -> list[messaging_pb2.Delivery]:
    assert isinstance(packed, bytes)
    frame = Frame.FromString(packed)
    assert frame.WhichOneof("frame") == "deliveries" and frame.seq == 0 and not frame.trace_context
    return list(frame.deliveries.deliveries)


def test_queued_deliveries_become_one_frame_in_order_with_their_trace_contexts() -> None:
    out = queued(delivery(2, redelivery=True), delivery(3))
    got = unpacked(take_batch(delivery(1), out, 8))
    assert [d.entry.offset for d in got] == [1, 2, 3]
    assert [d.redelivery for d in got] == [False, True, False]
    assert [d.trace_context["traceparent"] for d in got] == [f"00-{n:032x}-{n:016x}-01" for n in (1, 2, 3)]
    assert out.empty()


def test_a_lone_delivery_or_a_limit_of_one_stays_as_it_is() -> None:
    first = delivery(1)
    assert take_batch(first, queued(), 8) is first
    assert take_batch(first, queued(delivery(2)), 1) is first
    assert take_batch(first, queued(Frame(seq=4, sent=messaging_pb2.SendAck())), 8) is first
    sent = Frame(seq=5, sent=messaging_pb2.SendAck())
    behind = queued(delivery(2))
    assert take_batch(sent, behind, 8) is sent and behind.qsize() == 1  # not a delivery: as it is


def test_deliveries_in_gives_each_entry_with_its_trace_context() -> None:
    single = delivery(7)
    assert [(d.entry.offset, c["traceparent"]) for d, c in deliveries_in(single)] == [
        (7, single.trace_context["traceparent"])
    ]
    packed = Frame.FromString(take_batch(delivery(1), queued(delivery(2)), 8))  # type: ignore[arg-type]
    assert [(d.entry.offset, c["traceparent"][-19:]) for d, c in deliveries_in(packed)] == [
        (1, f"{1:016x}-01"),
        (2, f"{2:016x}-01"),
    ]
    assert deliveries_in(Frame(seq=1, sent=messaging_pb2.SendAck())) == []


def test_a_batch_stops_at_the_limit_and_before_a_frame_of_another_kind() -> None:
    out = queued(*(delivery(n) for n in range(2, 6)))
    assert [d.entry.offset for d in unpacked(take_batch(delivery(1), out, 3))] == [1, 2, 3]
    assert out.qsize() == 2
    sent, end = Frame(seq=9, sent=messaging_pb2.SendAck(client_id="c")), Closed(None)
    out = queued(delivery(2), sent, delivery(3), end)
    assert [d.entry.offset for d in unpacked(take_batch(delivery(1), out, 8))] == [1, 2]
    assert out.get_nowait() is sent and out.qsize() == 2  # the rest keeps its place


def test_a_batch_stops_before_the_entry_that_would_pass_the_byte_bound() -> None:
    big = b"p" * (BATCH_BYTES // 3)
    out = queued(*(delivery(n, big) for n in range(2, 6)))
    packed = take_batch(delivery(1, big), out, 64)
    assert [d.entry.offset for d in unpacked(packed)] == [1, 2]
    assert isinstance(packed, bytes) and len(packed) <= BATCH_BYTES
    assert out.qsize() == 3


def test_serialized_frames_pass_through_and_messages_are_serialized() -> None:
    serialize = serialize_or_pass(Frame.SerializeToString)
    frame = Frame(seq=3, heartbeat=common_pb2.Heartbeat())
    assert serialize(frame) == frame.SerializeToString()
    assert serialize(b"\x08\x03") == b"\x08\x03"


async def test_only_existing_streaming_methods_can_take_serialized_frames() -> None:
    server = grpc.aio.server()
    servicer = messaging_pb2_grpc.MessagingServiceServicer()
    add = messaging_pb2_grpc.add_MessagingServiceServicer_to_server
    with pytest.raises(ValueError, match="no method Nope"):
        add_accepting_serialized(add, servicer, server, ["Nope"])
    with pytest.raises(ValueError, match="response-streaming"):
        add_accepting_serialized(add, servicer, server, ["SendMessage"])

"""Deliveries in batches (OpenRequest.max_batch), on both backends: entries ready together come in
one `deliveries` frame, in offset order, each with its own trace context; nothing is lost, reordered
or sent twice, and a device that asks for no batches gets a frame per entry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bimip.core.errors import reason_of
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from services.messaging.delivery import MAX_BATCH
from tests.conftest import Backend
from tests.messaging_client import Device, devices, message
from tests.suite import Suite, running_suite

A, B = "alice@example.com", "bob@example.com"
WINDOW = 16


@pytest.fixture
def traced() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def suite(backend: Backend, tmp_path: Path, traced: InMemorySpanExporter) -> AsyncIterator[Suite]:
    async with running_suite(
        backend, tmp_path, ["messaging"], exporter=traced, BIMIP_WINDOW=str(WINDOW)
    ) as suite:
        yield suite


def _entry_frames(device: Device) -> list[messaging_pb2.ConnectResponse]:
    return [f for f in device.frames if f.WhichOneof("frame") in ("delivery", "deliveries")]


async def test_a_backlog_comes_in_batches_in_order(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1") as (a1,):
        sent = [await a1.sent(message(B, f"m{i}", f"payload {i}".encode())) for i in range(40)]
    async with devices(suite, f"{B}/b1", max_batch=8) as (b1,):
        assert b1.opened.max_batch == 8
        for upto in (16, 32, 40):  # the window (16) at a time
            await b1.wait_entries(upto)
            assert len(b1.entries()) == upto  # no more than the window in flight
            await b1.ack(upto)
        entries = b1.entries()
        assert [e.offset for e in entries] == list(range(1, 41))
        assert [e.message.client_id for e in entries] == [f"m{i}" for i in range(40)]
        assert [e.message.payload for e in entries] == [f"payload {i}".encode() for i in range(40)]
        assert [e.message.signal_id for e in entries] == [s.signal_id for s in sent]
        frames = _entry_frames(b1)
        batches = [f.deliveries for f in frames if f.WhichOneof("frame") == "deliveries"]
        assert batches, "entries ready together came one frame each"
        assert all(2 <= len(batch.deliveries) <= 8 for batch in batches)
        assert len(frames) < 40
        # Each entry of a batch carries its own trace context; the frame carries none.
        for frame in frames:
            if frame.WhichOneof("frame") == "deliveries":
                assert not frame.trace_context
                parents = [d.trace_context["traceparent"] for d in frame.deliveries.deliveries]
                assert len(set(parents)) == len(parents)
            else:
                assert "traceparent" in frame.trace_context
    # The cursor stands at the head: nothing is sent again.
    async with devices(suite, f"{B}/b1", max_batch=8) as (again,):
        assert again.opened.cursor == 40 and not again.entries()


async def test_without_max_batch_every_entry_has_its_own_frame(suite: Suite) -> None:
    async with devices(suite, f"{A}/a1") as (a1,):
        for i in range(10):
            await a1.sent(message(B, f"m{i}"))
    for asked in (0, 1):
        async with devices(suite, f"{B}/b{asked}", max_batch=asked) as (b1,):
            assert b1.opened.max_batch == 1
            await b1.wait_entries(10)
            assert [f.WhichOneof("frame") for f in _entry_frames(b1)] == ["delivery"] * 10
            assert b1.offsets() == list(range(1, 11))


async def test_the_server_bounds_max_batch(suite: Suite) -> None:
    async with devices(suite, f"{B}/b1", max_batch=1_000_000) as (b1,):
        assert b1.opened.max_batch == min(MAX_BATCH, WINDOW)


async def test_a_negative_max_batch_is_refused_and_others_go_on(suite: Suite) -> None:
    async with suite.channel("messaging") as channel:
        stub = messaging_pb2_grpc.MessagingServiceStub(channel)
        call = stub.Connect(metadata=(("authorization", f"Bearer {suite.token(B, 'b1')}"),))
        await call.write(messaging_pb2.ConnectRequest(open=messaging_pb2.OpenRequest(max_batch=-1)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(err.value) == "INVALID_BATCH"
    async with devices(suite, f"{A}/a1", f"{B}/b2") as (a1, b2):
        await a1.sent(message(B, "still served"))
        (entry,) = await b2.wait_entries(1)
        assert entry.message.client_id == "still served"

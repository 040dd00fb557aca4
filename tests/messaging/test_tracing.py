"""X6: one trace follows a message: send, persist, publish, delivery, ack, and the receipt back."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bimip.common.v1 import common_pb2
from bimip.messaging.v1 import messaging_pb2
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import devices, message
from tests.suite import running_suite

A, B = "alice@example.com", "bob@example.com"


async def test_one_trace_from_send_to_the_delivered_receipt(backend: Backend, tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    async with running_suite(backend, tmp_path, ["messaging"], exporter=exporter) as suite:
        async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
            await a1.sent(message(B, "traced", b"secret payload"))
            (entry,) = await b1.wait_entries(1)
            (delivery,) = b1.deliveries
            assert delivery is not None
            await b1.ack(entry.offset)
            await a1.wait_for(
                lambda: [r.status for r in a1.receipts()] == [common_pb2.DELIVERY_STATUS_DELIVERED]
            )

            def trace_of_message() -> list:  # type: ignore[type-arg]
                spans = exporter.get_finished_spans()
                sends = [s for s in spans if s.name == "messaging send"]
                if not sends:
                    return []
                trace_id = sends[0].context.trace_id
                mine = [s for s in spans if s.context.trace_id == trace_id]
                names = {s.name for s in mine}
                wanted = {
                    "messaging send",
                    "messaging commit",
                    "messaging publish",
                    "messaging deliver",
                    "messaging ack",
                }
                return (
                    mine
                    if wanted <= names and len([s for s in mine if s.name == "messaging deliver"]) >= 2
                    else []
                )

            spans = await eventually(trace_of_message)
            by_name: dict[str, list] = {}  # type: ignore[type-arg]
            for span in spans:
                by_name.setdefault(span.name, []).append(span)
            (send,) = by_name["messaging send"]
            assert send.attributes["bimip.user"] == A and send.attributes["bimip.device"] == "a1"
            assert (
                send.attributes["bimip.offset"] == 1
                and send.attributes["bimip.signal_id"] == entry.message.signal_id
            )
            assert send.parent is None  # the message's own trace, linked to the stream's
            assert send.links
            # Persisted: the commit and its database statements are in the trace.
            assert any(s.attributes.get("db.system") for s in spans)
            # Delivered to b1 (the message), then to a1 (the DELIVERED receipt).
            deliveries = {
                (s.attributes["bimip.device"], s.attributes["bimip.offset"])
                for s in by_name["messaging deliver"]
            }
            assert ("b1", 1) in deliveries and ("a1", 2) in deliveries
            (ack,) = by_name["messaging ack"]
            assert ack.attributes["bimip.device"] == "b1" and ack.attributes["bimip.offset"] == 1
            # Ids, never payloads.
            for span in spans:
                for value in span.attributes.values():
                    assert "secret payload" not in str(value)


async def test_without_an_exporter_deliveries_still_carry_the_senders_trace(
    backend: Backend, tmp_path: Path
) -> None:
    """No spans are built for deliveries when nothing exports them, but the trace goes on: the
    recipient's delivery, and the sender's receipt, name the trace the sender's frame started."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    client_parent = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        assert not suite.services["messaging"].runtime.telemetry.exporting
        async with devices(suite, f"{A}/a1", f"{B}/b1", max_batch=8) as (a1, b1):
            seq = await a1.write(
                send=messaging_pb2.SendRequest(message=message(B, "traced")), trace_context=client_parent
            )
            assert (await a1.reply(seq)).WhichOneof("frame") == "sent"
            (entry,) = await b1.wait_entries(1)
            (frame,) = [f for f in b1.frames if f.WhichOneof("frame") == "delivery"]
            assert frame.trace_context["traceparent"].split("-")[1] == trace_id
            await b1.ack(entry.offset)
            await a1.wait_for(lambda: a1.receipts())
            (receipt,) = [f for f in a1.frames if f.WhichOneof("frame") == "delivery"]
            assert receipt.trace_context["traceparent"].split("-")[1] == trace_id

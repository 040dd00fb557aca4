"""SPEC X6, end to end: the edges of docs/trace-edges.toml, checked against the spans that the
services, running as separate processes (two messaging replicas, awareness, sync) on PostgreSQL and
Redis, and the SDK export over OTLP to a real receiver."""

from __future__ import annotations

import asyncio
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bimip.sdk import DELIVERED, Client, MessageReceived, ReceiptUpdated
from tests.conftest import Backend
from tests.helpers import eventually
from tests.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver  # noqa: F401
from tests.processes import ServiceProcess, free_ports, running_processes, token
from tests.suite import suite_env

ROOT = Path(__file__).resolve().parents[2]
EDGES = tomllib.loads((ROOT / "docs" / "trace-edges.toml").read_text())
A, B = "alice@example.com", "bob@example.com"
SECRET = "a payload that must never reach a span"


def _matches(span: ReceivedSpan, spec: dict[str, Any]) -> bool:
    return (
        span.service_name == spec["service"]
        and spec["span"] in ("*", span.name)
        and all(span.attributes.get(k) == v for k, v in spec.get("where", {}).items())
    )


def _instance(span: ReceivedSpan) -> Any:
    return span.resource.get("service.instance.id")


def _holds(edge: dict[str, Any], spans: list[ReceivedSpan]) -> bool:
    """Some `from` span and some `to` span of these spans (one trace) stand in the edge's relation."""
    by_id = {s.span_id: s for s in spans}
    for child in (s for s in spans if _matches(s, edge["to"])):
        ancestor = by_id.get(child.parent_span_id)
        while ancestor is not None:
            if _matches(ancestor, edge["from"]) and (
                edge.get("instance") != "other" or _instance(ancestor) != _instance(child)
            ):
                return True
            if edge["relation"] == "parent":
                break
            ancestor = by_id.get(ancestor.parent_span_id)
    return False


def _traces(spans: Iterable[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    traces: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    return traces


def _missing(kind: str, spans: list[ReceivedSpan], trace_id: str | None = None) -> list[str]:
    """The edges of `kind` that no trace (or not the given trace) shows."""
    traces = _traces(spans)
    candidates = [traces.get(trace_id, [])] if trace_id else list(traces.values())
    return [e["what"] for e in EDGES[kind] if not any(_holds(e, t) for t in candidates)]


async def test_the_edges_a_message_crosses_are_one_trace_across_processes(
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    otlp_receiver: OtlpReceiver,  # noqa: F811
) -> None:
    backend = Backend("scale", postgres_url, redis_url, f"bimip-t-edges-{uuid.uuid4().hex[:8]}")
    env = {
        **suite_env(backend, tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    r1_port, r2_port, aw_port, sync_port = free_ports(4)
    first = ServiceProcess("messaging", {**env, "BIMIP_REPLICA_ID": "r1"}, tmp_path / "r1.log", port=r1_port)
    async with running_processes([first]):  # the first one migrates the database
        linked = {**env, "BIMIP_MESSAGING_ADDRESS": first.address}
        others = [
            ServiceProcess("messaging", {**env, "BIMIP_REPLICA_ID": "r2"}, tmp_path / "r2.log", port=r2_port),
            ServiceProcess("awareness", linked, tmp_path / "awareness.log", port=aw_port),
            ServiceProcess("sync", linked, tmp_path / "sync.log", port=sync_port),
        ]
        async with running_processes(others) as (second, awareness, sync):
            provider = TracerProvider(resource=Resource.create({"service.name": "client"}))
            exporter = OTLPSpanExporter(endpoint=otlp_receiver.endpoint, insecure=True)
            provider.add_span_processor(SimpleSpanProcessor(exporter))

            def client(eid: str, device: str, messaging: str, **options: Any) -> Client:
                return Client(
                    token(env, eid, device),
                    store=tmp_path / f"{eid}-{device}.db",
                    messaging=messaging,
                    awareness=awareness.address,
                    sync=sync.address,
                    tracer_provider=provider,
                    backoff=(0.05, 0.5),
                    **options,
                )

            a1 = client(A, "a1", first.address)
            b1 = client(B, "b1", second.address)
            async with a1, b1:
                sent = await a1.send(B, SECRET.encode())
                async for event in b1.events():
                    if isinstance(event, MessageReceived):
                        b1.processed(event.offset)  # handled: acked
                        break
                async for event in a1.events():
                    if isinstance(event, ReceiptUpdated) and event.receipt.status == DELIVERED:
                        break
                # A device that wrote while messaging was out of reach comes back through sync.
                offline = client(A, "a2", f"127.0.0.1:{free_ports(1)[0]}", awareness_stream=False)
                async with offline:
                    upload = asyncio.create_task(offline.send(B, b"written offline"))
                    await eventually(lambda: _appended(otlp_receiver), timeout=30)
                    upload.cancel()
            provider.force_flush()
            await asyncio.to_thread(provider.shutdown)

            def message_trace() -> str | None:
                sends = [
                    s
                    for s in otlp_receiver.spans
                    if s.service_name == "client"
                    and s.name == "send"
                    and s.attributes.get("bimip.signal_id") == sent.signal_id
                ]
                return sends[0].trace_id if sends else None

            trace_id = await eventually(message_trace, timeout=30)
            await eventually(lambda: _all_there("message", otlp_receiver.spans, trace_id), timeout=30)
            await eventually(lambda: _all_there("call", otlp_receiver.spans), timeout=30)

            spans = otlp_receiver.spans
            mine = [s for s in spans if s.trace_id == trace_id]
            # Span conventions: RPC spans carry rpc.*, messaging spans messaging.*, ours bimip.* ids.
            for span in mine:
                if span.name.startswith("/"):
                    assert span.attributes.get("rpc.system") == "grpc", span
                if span.name in (
                    "messaging publish",
                    "messaging deliver",
                    "messaging ack",
                    "send",
                    "receive",
                ):
                    assert span.attributes.get("messaging.system") in ("bimip", "redis"), span
                    assert span.attributes.get("messaging.operation.type"), span
            send = next(s for s in mine if s.name == "send")
            assert (send.attributes["bimip.user"], send.attributes["bimip.offset"]) == (A, sent.offset)
            # Ids, never payloads, anywhere.
            for span in spans:
                assert SECRET not in repr(span.attributes), span


def _all_there(kind: str, spans: list[ReceivedSpan], trace_id: str | None = None) -> bool:
    missing = _missing(kind, spans, trace_id)
    mine = sorted(
        f"{s.service_name}:{s.name}:{s.span_id}<-{s.parent_span_id}"
        for s in spans
        if trace_id is None or s.trace_id == trace_id
    )
    assert not missing, f"edges not in the trace: {missing}; spans: {mine if trace_id else len(spans)}"
    return True


def _appended(receiver: OtlpReceiver) -> bool:
    return any(s.name == "messaging link append" for s in receiver.spans)

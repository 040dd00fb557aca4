"""X6 for awareness: a presence change on one replica is one trace with the awareness stream, the
Redis publish and the delivery to the subscriber on the other replica."""

from __future__ import annotations

import uuid
from pathlib import Path

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.core.config import load_settings
from bimip.core.server import start_service
from services.awareness.app import build as build_awareness
from services.awareness.config import AwarenessSettings
from tests.awareness.test_presence import A, S, open_stream, subscribe
from tests.conftest import Backend
from tests.helpers import eventually
from tests.suite import running_suite, suite_env


async def test_a_presence_change_is_one_trace_across_replicas(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    backend = Backend("scale", postgres_url, redis_url, f"bimip-t-trace-{uuid.uuid4().hex[:8]}")
    exporter = InMemorySpanExporter()
    async with running_suite(backend, tmp_path, ["messaging", "awareness"], exporter=exporter) as suite:
        env = suite_env(
            backend, tmp_path, BIMIP_MESSAGING_ADDRESS=suite.address("messaging"), BIMIP_REPLICA_ID="r2"
        )
        second = await start_service(
            "awareness",
            build_awareness,
            suite.shared,
            load_settings(AwarenessSettings, env),
            exporter=exporter,
        )
        try:
            async with suite.channel("awareness") as one:
                import grpc

                async with grpc.aio.insecure_channel(second.address) as two:
                    await subscribe(suite, one, S, A)
                    s1 = await open_stream(suite, two, S, "s1")  # the subscriber on replica 2
                    a1 = await open_stream(suite, one, A, "a1")  # the change on replica 1
                    await eventually(lambda: s1.presences(A) == [aw.STATUS_ONLINE])
                    exporter.clear()
                    await a1.ask(intent=aw.IntentRequest(intent=aw.STATUS_DND))
                    await eventually(lambda: s1.presences(A) == [aw.STATUS_ONLINE, aw.STATUS_DND])

                    def trace() -> list:  # type: ignore[type-arg]
                        spans = exporter.get_finished_spans()
                        delivered = [
                            s
                            for s in spans
                            if s.name == "awareness deliver"
                            and s.attributes.get("bimip.replica") == "r2"
                            and s.attributes.get("messaging.destination.name") == f"aw-presence:{A}"
                        ]
                        if not delivered:
                            return []
                        trace_id = delivered[0].context.trace_id
                        return [s for s in spans if s.context.trace_id == trace_id]

                    spans = await eventually(trace)
                    kinds = {(s.kind, s.resource.attributes.get("service.name")) for s in spans}
                    assert (SpanKind.PRODUCER, "awareness") in kinds  # the Redis publish
                    assert (SpanKind.CONSUMER, "awareness") in kinds  # the delivery on replica 2
                    # The whole trace hangs off replica 1's awareness stream: its span is the root.
                    by_id = {s.context.span_id: s for s in spans}
                    roots = {s.parent.span_id for s in spans if s.parent and s.parent.span_id not in by_id}
                    assert len(roots) == 1
                    await a1.close()
                    await s1.close()
        finally:
            await second.stop(grace=0.5)

"""X6: spans reach a real OTLP/gRPC receiver, with RPC, database and Redis spans joined in one trace."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bimip.core.telemetry import Telemetry, setup_telemetry
from tests.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver  # noqa: F401

CHECK = "/grpc.health.v1.Health/Check"


def _is_db_span(span: ReceivedSpan) -> bool:
    return span.kind is SpanKind.CLIENT and (
        span.name.upper().startswith("SELECT")
        or "db.system" in span.attributes
        or "db.system.name" in span.attributes
    )


class DatabaseHealth(HealthServicer):
    """Answers Check only after a round trip to the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self._engine = engine

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def telemetry(otlp_receiver: OtlpReceiver) -> AsyncIterator[Telemetry]:  # noqa: F811
    t = setup_telemetry("telemetry-test", otlp_endpoint=otlp_receiver.endpoint)
    try:
        yield t
    finally:
        t.shutdown()


async def _check_through_instrumented_grpc(telemetry: Telemetry, engine: AsyncEngine) -> None:
    server = grpc.aio.server(interceptors=telemetry.server_interceptors())
    health_pb2_grpc.add_HealthServicer_to_server(DatabaseHealth(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=telemetry.client_interceptors()
        ) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_client_server_and_database_spans_form_one_trace(
    telemetry: Telemetry,
    otlp_receiver: OtlpReceiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'telemetry.db'}")
    telemetry.instrument_engine(engine)
    telemetry.instrument_engine(engine)  # a second call must not double the spans
    try:
        await _check_through_instrumented_grpc(telemetry, engine)
    finally:
        await engine.dispose()

    assert telemetry.force_flush()

    [client] = await otlp_receiver.wait_for(lambda s: s.name == CHECK and s.kind is SpanKind.CLIENT)
    [server] = await otlp_receiver.wait_for(lambda s: s.name == CHECK and s.kind is SpanKind.SERVER)
    [db] = await otlp_receiver.wait_for(_is_db_span)

    assert client.trace_id == server.trace_id == db.trace_id
    assert int(client.trace_id, 16) != 0
    assert server.parent_span_id == client.span_id
    assert db.parent_span_id == server.span_id
    for span in (client, server, db):
        assert span.service_name == "telemetry-test"
        assert span.resource["service.namespace"] == "bimip"
    assert db.attributes.get("db.system", db.attributes.get("db.system.name")) == "sqlite"


async def test_postgresql_statements_are_traced(
    telemetry: Telemetry,
    otlp_receiver: OtlpReceiver,  # noqa: F811
    postgres_url: str,
) -> None:
    """Guards the pin on SQLAlchemy: the instrumentation must produce spans for asyncpg engines."""
    engine = create_async_engine(postgres_url)
    telemetry.instrument_engine(engine)
    try:
        with telemetry.tracer("test").start_as_current_span("parent") as parent:
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 41 + 1"))).scalar_one() == 42
        parent_span_id = format(parent.get_span_context().span_id, "016x")
    finally:
        await engine.dispose()

    assert telemetry.force_flush()
    [db] = await otlp_receiver.wait_for(lambda s: _is_db_span(s) and s.parent_span_id == parent_span_id)
    assert db.attributes.get("db.system", db.attributes.get("db.system.name")) == "postgresql"
    assert "SELECT 41 + 1" in str(db.attributes.get("db.statement", db.attributes.get("db.query.text")))


async def test_redis_commands_are_traced(
    telemetry: Telemetry,
    otlp_receiver: OtlpReceiver,  # noqa: F811
    redis_url: str,
) -> None:
    client = aioredis.from_url(redis_url)
    untraced = aioredis.from_url(redis_url)
    key = f"bimip-telemetry-test:{uuid.uuid4().hex}"
    telemetry.instrument_redis(client)
    telemetry.instrument_redis(client)  # idempotent
    try:
        with telemetry.tracer("test").start_as_current_span("parent") as parent:
            await client.set(key, "v", ex=60)
            assert await client.get(key) == b"v"
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(f"{key}:n")
                pipe.expire(f"{key}:n", 60)
                await pipe.execute()
            await untraced.exists(key)  # another client: not instrumented
        trace_id = format(parent.get_span_context().trace_id, "032x")
        await client.delete(key, f"{key}:n")
    finally:
        await client.aclose()
        await untraced.aclose()

    assert telemetry.force_flush()
    in_trace = await otlp_receiver.wait_for(
        lambda s: s.trace_id == trace_id and s.kind is SpanKind.CLIENT, count=3
    )
    names = sorted(s.name for s in in_trace)
    assert "SET" in names and "GET" in names, names
    assert any("INCR" in s.name or "MULTI" in s.name for s in in_trace), names
    assert "EXISTS" not in names, names
    for span in in_trace:
        assert span.attributes.get("db.system", span.attributes.get("db.system.name")) == "redis"
        assert span.service_name == "telemetry-test"


async def _echo_read_write(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
    """A bidirectional handler in the read/write style: a coroutine, not an async generator."""
    while (message := await context.read()) is not grpc.aio.EOF:
        await context.write(message + b"!")


async def _echo_generator(
    request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        yield message + b"?"


async def _count_read_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    for i in range(3):
        await context.write(request + str(i).encode())


async def test_streams_in_both_handler_styles_are_traced(
    telemetry: Telemetry,
    otlp_receiver: OtlpReceiver,  # noqa: F811
) -> None:
    """The stock aio server interceptor breaks coroutine-style streaming handlers (the health
    service's Watch among them); Telemetry's must serve and trace both styles."""
    handlers = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "ReadWrite": grpc.stream_stream_rpc_method_handler(_echo_read_write),
            "Generator": grpc.stream_stream_rpc_method_handler(_echo_generator),
            "Count": grpc.unary_stream_rpc_method_handler(_count_read_write),
        },
    )
    server = grpc.aio.server(interceptors=telemetry.server_interceptors())
    server.add_generic_rpc_handlers((handlers,))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=telemetry.client_interceptors()
        ) as channel:
            for method, suffix in (("ReadWrite", b"!"), ("Generator", b"?")):
                call = channel.stream_stream(f"/test.Echo/{method}")()
                for word in (b"a", b"b"):
                    await call.write(word)
                    assert await call.read() == word + suffix
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
            counted = [r async for r in channel.unary_stream("/test.Echo/Count")(b"n")]
            assert counted == [b"n0", b"n1", b"n2"]

            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
    finally:
        await server.stop(None)

    assert telemetry.force_flush()
    for method in ("/test.Echo/ReadWrite", "/test.Echo/Generator", "/test.Echo/Count"):
        [client] = await otlp_receiver.wait_for(lambda s, m=method: s.name == m and s.kind is SpanKind.CLIENT)
        [server_span] = await otlp_receiver.wait_for(
            lambda s, m=method: s.name == m and s.kind is SpanKind.SERVER
        )
        assert server_span.parent_span_id == client.span_id
        assert server_span.trace_id == client.trace_id
        assert server_span.status != "ERROR" and client.status != "ERROR"
    await otlp_receiver.wait_for(
        lambda s: s.name == "/grpc.health.v1.Health/Watch" and s.kind is SpanKind.SERVER
    )


async def test_services_in_one_process_keep_their_own_service_name(
    otlp_receiver: OtlpReceiver,  # noqa: F811
) -> None:
    first_memory, second_memory = InMemorySpanExporter(), InMemorySpanExporter()
    first = setup_telemetry("svc-one", otlp_endpoint=otlp_receiver.endpoint, exporter=first_memory)
    second = setup_telemetry(
        "svc-two", exporter=second_memory, resource_attributes={"deployment.environment": "test"}
    )
    try:
        with first.tracer("t").start_as_current_span("one-outer"):
            with second.tracer("t").start_as_current_span("two-inner"):
                pass
        with second.tracer("t").start_as_current_span("two-alone"):
            pass
    finally:
        first.shutdown()
        second.shutdown()

    assert [s.name for s in first_memory.get_finished_spans()] == ["one-outer"]
    assert sorted(s.name for s in second_memory.get_finished_spans()) == ["two-alone", "two-inner"]
    for span in second_memory.get_finished_spans():
        assert span.resource.attributes["service.name"] == "svc-two"
        assert span.resource.attributes["deployment.environment"] == "test"

    received = await otlp_receiver.wait_for(lambda s: s.name == "one-outer")
    assert [s.service_name for s in received] == ["svc-one"]
    assert not [s for s in otlp_receiver.spans if s.name.startswith("two-")]

    # The global provider was never replaced: it is still the no-op proxy.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    assert not isinstance(trace.get_tracer_provider(), TracerProvider)

"""The pub/sub bus (SPEC A8, X5, X6) on both backends: in process and a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bimip.core.pubsub import (
    REDIS_POOL_SIZE,
    Bus,
    BusError,
    BusMessage,
    InProcessBroker,
    InProcessBus,
    PendingPublishes,
    RedisBus,
    Subscription,
    consumer_span,
    redis_client,
)
from tests.conftest import Backend
from tests.helpers import eventually

MakeBus = Callable[..., Bus]


@pytest.fixture
async def make_bus(backend: Backend) -> AsyncIterator[MakeBus]:
    """Builds buses for `backend`; all of one test share a namespace (and, embedded, one broker)."""
    broker = InProcessBroker()
    made: list[Bus] = []

    def make(
        *,
        origin: str = "replica-a",
        namespace: str | None = None,
        max_queue: int = 10_000,
        tracer_provider: TracerProvider | None = None,
    ) -> Bus:
        ns = namespace or backend.namespace
        bus: Bus
        if backend.redis_url is None:
            bus = InProcessBus(
                namespace=ns,
                origin=origin,
                max_queue=max_queue,
                tracer_provider=tracer_provider,
                broker=broker,
            )
        else:
            bus = RedisBus(
                backend.redis_url,
                namespace=ns,
                origin=origin,
                max_queue=max_queue,
                tracer_provider=tracer_provider,
                socket_timeout=2.0,
            )
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.close()


@pytest.fixture
async def redis_numsub(backend: Backend) -> AsyncIterator[Callable[[str], Any]]:
    """How many Redis connections are subscribed to a channel of this test (scale only)."""
    client = aioredis.from_url(backend.redis_url) if backend.redis_url else None

    async def numsub(channel: str) -> int:
        assert client is not None
        [(_, count)] = await client.pubsub_numsub(f"{backend.namespace}:{channel}")
        return int(count)

    yield numsub
    if client is not None:
        await client.aclose()


async def next_message(sub: Subscription, timeout: float = 5.0) -> BusMessage:
    return await asyncio.wait_for(anext(sub), timeout)


async def test_order_per_channel(make_bus: MakeBus) -> None:
    bus = make_bus()
    sub = await bus.subscribe("user:alice")
    sent = [f"m{i}".encode() for i in range(500)]
    for body in sent:
        await bus.publish("user:alice", body)
    got = [await next_message(sub) for _ in sent]
    assert [m.body for m in got] == sent
    assert {m.channel for m in got} == {"user:alice"}
    assert {m.origin for m in got} == {"replica-a"}
    assert not any(m.gap for m in got)


async def test_fan_out_to_several_subscriptions(
    make_bus: MakeBus, backend: Backend, redis_numsub: Any
) -> None:
    bus = make_bus()
    subs = [await bus.subscribe("room") for _ in range(3)]
    if backend.redis_url:
        assert await redis_numsub("room") == 1  # one Redis subscription serves all local ones
    sent = [f"m{i}".encode() for i in range(50)]
    await bus.publish_many([("room", body) for body in sent])
    for sub in subs:
        assert [(await next_message(sub)).body for _ in sent] == sent


async def test_fan_out_across_replicas(make_bus: MakeBus, backend: Backend, redis_numsub: Any) -> None:
    bus_a = make_bus(origin="replica-a")
    bus_b = make_bus(origin="replica-b")
    on_b = [await bus_b.subscribe("room") for _ in range(2)]
    on_a = await bus_a.subscribe("room")
    if backend.redis_url:
        assert await redis_numsub("room") == 2  # one per bus, not one per local subscription
    sent = [f"m{i}".encode() for i in range(30)]
    for body in sent:
        await bus_a.publish("room", body)
    for sub in [*on_b, on_a]:
        got = [await next_message(sub) for _ in sent]
        assert [m.body for m in got] == sent
        assert {m.origin for m in got} == {"replica-a"}
    await bus_b.publish("room", b"from-b")
    assert (await next_message(on_a)).origin == "replica-b"


async def test_namespaces_are_isolated(make_bus: MakeBus, backend: Backend) -> None:
    mine = make_bus()
    other = make_bus(namespace=f"{backend.namespace}-other")
    sub = await mine.subscribe("room", "marker")
    await other.publish("room", b"elsewhere")
    await mine.publish("marker", b"end")
    assert (await next_message(sub)).channel == "marker"


async def test_remove_stops_delivery(make_bus: MakeBus, backend: Backend, redis_numsub: Any) -> None:
    bus = make_bus()
    sub = await bus.subscribe("a")
    await sub.add("marker")
    assert sub.channels == {"a", "marker"}
    await bus.publish("a", b"a1")
    assert (await next_message(sub)).body == b"a1"
    await bus.publish("a", b"a2")  # queued, never read: remove() drops it too
    await eventually(lambda: sub.pending == 1)
    await sub.remove("a")
    assert sub.channels == {"marker"}
    await bus.publish("a", b"a3")
    await bus.publish("marker", b"end")
    got = await next_message(sub)
    assert (got.channel, got.body) == ("marker", b"end")
    assert sub.pending == 0
    if backend.redis_url:
        await eventually(lambda: _is_zero(redis_numsub("a")))
    await sub.add("a")  # and back again
    await bus.publish("a", b"a4")
    assert (await next_message(sub)).body == b"a4"


async def test_close_ends_iteration_and_releases(
    make_bus: MakeBus, backend: Backend, redis_numsub: Any
) -> None:
    bus = make_bus()
    closing = await bus.subscribe("a")
    staying = await bus.subscribe("a", "marker")
    await bus.publish("a", b"a1")
    await eventually(lambda: closing.pending == 1)
    await closing.close()
    assert closing.closed
    assert [m async for m in closing] == []  # iteration ends, even with messages queued before
    with pytest.raises(BusError):
        await closing.add("b")
    await bus.publish("a", b"a2")
    await bus.publish("marker", b"end")
    assert [(await next_message(staying)).body for _ in range(3)] == [b"a1", b"a2", b"end"]
    if backend.redis_url:
        assert await redis_numsub("a") == 1  # another local subscriber still wants it
    await staying.close()
    if backend.redis_url:
        await eventually(lambda: _is_zero(redis_numsub("a")))
        await eventually(lambda: _is_zero(redis_numsub("marker")))


async def test_closing_the_bus_ends_every_subscription(make_bus: MakeBus) -> None:
    bus = make_bus()
    sub = await bus.subscribe("a")
    reader = asyncio.create_task(anext(sub, None))
    await bus.close()
    assert await asyncio.wait_for(reader, 5) is None
    assert sub.closed
    assert await bus.ping() is False
    with pytest.raises(BusError):
        await bus.subscribe("a")
    with pytest.raises(BusError):
        await bus.publish("a", b"x")
    await bus.close()  # idempotent


async def test_trace_context_crosses_a_publish(make_bus: MakeBus) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    publisher = make_bus(tracer_provider=provider)
    receiver = make_bus(origin="replica-b", tracer_provider=provider)
    sub = await receiver.subscribe("user:bob")

    with tracer.start_as_current_span("send") as send_span:
        await publisher.publish("user:bob", b"hello")
    trace_id = send_span.get_span_context().trace_id

    msg = await next_message(sub)
    received = trace.get_current_span(msg.context).get_span_context()
    assert received.trace_id == trace_id
    assert received.is_remote

    producer = next(s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER)
    assert producer.context.trace_id == trace_id
    assert producer.parent is not None and producer.parent.span_id == send_span.get_span_context().span_id
    assert received.span_id == producer.context.span_id  # the consumer's parent is the PRODUCER span

    with consumer_span(tracer, msg):
        pass
    consumer = next(s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER)
    assert consumer.context.trace_id == trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id


async def test_publish_many_delivers_all_in_order(make_bus: MakeBus) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = make_bus(tracer_provider=provider)
    sub = await bus.subscribe("x", "y")
    items = [("x" if i % 3 else "y", f"m{i}".encode()) for i in range(200)]
    await bus.publish_many(items)
    got = [await next_message(sub) for _ in items]
    for channel in ("x", "y"):
        assert [m.body for m in got if m.channel == channel] == [b for c, b in items if c == channel]
    assert sorted(m.body for m in got) == sorted(b for _, b in items)
    producers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert len(producers) == 1  # one batch, one span
    assert {trace.get_current_span(m.context).get_span_context().span_id for m in got} == {
        producers[0].context.span_id
    }
    await bus.publish_many([])  # nothing to do


async def test_slow_subscriber_loses_oldest_and_sees_a_gap(make_bus: MakeBus) -> None:
    bus = make_bus(max_queue=5)
    slow = await bus.subscribe("c")
    fast = await make_bus(origin="replica-b").subscribe("c")  # default queue: keeps everything
    for i in range(20):
        await bus.publish("c", f"m{i}".encode())  # never waits for the slow reader
    assert [(await next_message(fast)).body for _ in range(20)] == [f"m{i}".encode() for i in range(20)]
    await eventually(lambda: slow.dropped == 15)
    got = [await next_message(slow) for _ in range(5)]
    assert [m.body for m in got] == [f"m{i}".encode() for i in range(15, 20)]
    assert [m.gap for m in got] == [True, False, False, False, False]
    await bus.publish("c", b"after")
    later = await next_message(slow)
    assert (later.body, later.gap) == (b"after", False)


async def test_pending_publishes_wait_for_flush(make_bus: MakeBus) -> None:
    bus = make_bus()
    sub = await bus.subscribe("c")
    pending = PendingPublishes()
    pending.add("c", b"one")
    pending.add("c", b"two")
    assert len(pending) == 2
    await bus.publish("c", b"marker-1")
    assert (await next_message(sub)).body == b"marker-1"  # nothing went out before the flush
    await pending.flush(bus)
    assert len(pending) == 0
    assert [(await next_message(sub)).body for _ in range(2)] == [b"one", b"two"]

    pending.add("c", b"rolled-back")
    pending.discard()
    await pending.flush(bus)
    await bus.publish("c", b"marker-2")
    assert (await next_message(sub)).body == b"marker-2"


async def test_ping(make_bus: MakeBus) -> None:
    bus = make_bus()
    assert await bus.ping() is True


async def test_unreachable_redis_fails_fast() -> None:
    bus = RedisBus("redis://127.0.0.1:1/0", namespace="unreachable", origin="r", socket_timeout=0.5)
    try:
        started = time.monotonic()
        assert await bus.ping() is False
        with pytest.raises(BusError):
            await bus.publish("c", b"x")
        pending = PendingPublishes()
        pending.add("c", b"x")
        await pending.flush(bus)  # logged, not raised: the commit already happened
        assert time.monotonic() - started < 3.0
    finally:
        await bus.close()


async def test_redis_reconnects_and_flags_the_gap(redis_url: str) -> None:
    namespace = f"bimip-t-{uuid.uuid4().hex[:8]}"
    name = f"bimip-bus-{uuid.uuid4().hex[:8]}"
    bus = RedisBus(redis_url, namespace=namespace, origin="r", client_name=name)
    admin = aioredis.from_url(redis_url)
    try:
        sub = await bus.subscribe("c")
        await bus.publish("c", b"before")
        assert (await next_message(sub)).gap is False

        killed = 0
        for client in await admin.client_list():
            if client.get("name") == name and int(client.get("sub", 0)) > 0:
                killed += await admin.client_kill_filter(_id=client["id"])
        assert killed == 1  # the one subscriber connection

        async def probe() -> BusMessage | None:
            await bus.publish("c", b"probe")  # may be missed while the bus reconnects
            try:
                return await next_message(sub, timeout=0.2)
            except TimeoutError:
                return None

        first = await eventually(probe)
        assert first.gap is True
        await bus.publish("c", b"after")
        while (msg := await next_message(sub)).body == b"probe":
            assert msg.gap is False
        assert (msg.body, msg.gap) == (b"after", False)
    finally:
        await admin.aclose()
        await bus.close()


async def _is_zero(count: Any) -> bool:
    return bool(await count == 0)


async def test_redis_wire_format_is_the_envelope(redis_url: str) -> None:
    """What other replicas (or tools) see on Redis: a bimip.bus.v1.Envelope on `namespace:channel`."""
    from bimip.bus.v1 import bus_pb2

    namespace = f"bimip-t-{uuid.uuid4().hex[:8]}"
    bus = RedisBus(redis_url, namespace=namespace, origin="replica-x")
    raw = aioredis.from_url(redis_url)
    pubsub = raw.pubsub()
    provider = TracerProvider()
    try:
        await pubsub.subscribe(f"{namespace}:user:carol")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        with provider.get_tracer("test").start_as_current_span("send") as span:
            await bus.publish("user:carol", b"payload")
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        envelope = bus_pb2.Envelope.FromString(message["data"])
        assert (envelope.body, envelope.origin) == (b"payload", "replica-x")
        trace_id = f"{span.get_span_context().trace_id:032x}"
        assert envelope.trace_context["traceparent"].split("-")[1] == trace_id
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await raw.aclose()
        await bus.close()


async def test_a_burst_beyond_the_redis_pool_waits_instead_of_failing(redis_url: str) -> None:
    """Hundreds of concurrent commands (a burst of stream opens) share REDIS_POOL_SIZE connections."""
    name = f"bimip-t-burst-{uuid.uuid4().hex[:8]}"
    client = redis_client(redis_url, client_name=name)
    observer = aioredis.from_url(redis_url)
    try:
        results = await asyncio.gather(*(client.incr(name) for _ in range(REDIS_POOL_SIZE * 5)))
        assert sorted(results) == list(range(1, REDIS_POOL_SIZE * 5 + 1))
        connections = [c for c in await observer.client_list() if c.get("name") == name]
        assert 1 <= len(connections) <= REDIS_POOL_SIZE
    finally:
        await client.delete(name)
        await client.aclose()
        await observer.aclose()

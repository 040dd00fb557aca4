"""The in-process bus's own rules (no Redis needed)."""

from __future__ import annotations

import asyncio

import pytest

from bimip.core.pubsub import BusError, BusMessage, InProcessBroker, InProcessBus, PendingPublishes


async def test_buses_without_a_shared_broker_are_separate() -> None:
    a = InProcessBus(namespace="ns", origin="a")
    b = InProcessBus(namespace="ns", origin="b")
    sub = await b.subscribe("c", "marker")
    await a.publish("c", b"not for b")
    await b.publish("marker", b"end")
    assert (await asyncio.wait_for(anext(sub), 1)).channel == "marker"
    await a.close()
    await b.close()


async def test_closing_one_bus_leaves_the_others_on_the_broker() -> None:
    broker = InProcessBroker()
    a = InProcessBus(namespace="ns", origin="a", broker=broker)
    b = InProcessBus(namespace="ns", origin="b", broker=broker)
    on_a = await a.subscribe("c")
    on_b = await b.subscribe("c")
    await a.close()
    assert on_a.closed
    await b.publish("c", b"x")
    assert (await asyncio.wait_for(anext(on_b), 1)).body == b"x"
    await b.close()


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        InProcessBus(namespace="ns", origin="a", max_queue=0)
    bus = InProcessBus(namespace="ns", origin="a")
    with pytest.raises(ValueError, match="channel"):
        await bus.subscribe("")
    with pytest.raises(ValueError, match="channel"):
        await bus.publish("", b"x")
    with pytest.raises(TypeError, match="bytes"):
        await bus.publish("c", "text")  # type: ignore[arg-type]
    await bus.close()


async def test_add_and_remove_are_idempotent() -> None:
    bus = InProcessBus(namespace="ns", origin="a")
    sub = await bus.subscribe("c", "c")
    await sub.add("c")
    await sub.remove("nope")
    await bus.publish("c", b"once")
    assert (await asyncio.wait_for(anext(sub), 1)).body == b"once"
    assert sub.pending == 0  # delivered once, not once per add
    await sub.close()
    await sub.close()
    await bus.close()


async def test_flush_of_a_closed_bus_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    bus = InProcessBus(namespace="ns", origin="a")
    await bus.close()
    pending = PendingPublishes()
    pending.add("c", b"x")
    await pending.flush(bus)
    assert len(pending) == 0
    assert "not published" in caplog.text
    with pytest.raises(BusError):
        await bus.publish("c", b"x")


def test_messages_compare_without_their_context() -> None:
    from opentelemetry.context import Context

    one = BusMessage("c", b"x", Context(), "a")
    assert one == BusMessage("c", b"x", Context({"k": 1}), "a")
    assert hash(one) == hash(BusMessage("c", b"x", Context(), "a"))
    assert one.gap is False

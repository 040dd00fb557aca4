"""The small per-stream asyncio primitives behave like asyncio's own, in what the services use."""

from __future__ import annotations

import asyncio
import sys

import pytest

from bimip.core.aio import Flag, Mailbox
from tests.helpers import eventually


async def test_mailbox_is_first_in_first_out_and_wakes_its_consumer() -> None:
    box: Mailbox[int] = Mailbox()
    got: list[int] = []

    async def consume() -> None:
        while len(got) < 3:
            got.append(await box.get())

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)  # the consumer now waits on an empty mailbox
    for n in (1, 2, 3):
        box.put_nowait(n)
    await asyncio.wait_for(consumer, 5)
    assert got == [1, 2, 3]
    assert box.empty() and box.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        box.get_nowait()


def test_peek_shows_the_oldest_item_and_leaves_it() -> None:
    box: Mailbox[str] = Mailbox()
    with pytest.raises(asyncio.QueueEmpty):
        box.peek_nowait()
    box.put_nowait("a")
    box.put_nowait("b")
    assert box.peek_nowait() == "a" and box.qsize() == 2
    assert box.get_nowait() == "a" and box.peek_nowait() == "b"


async def test_a_full_mailbox_holds_producers_back_in_order() -> None:
    box: Mailbox[str] = Mailbox(2)
    box.put_nowait("a")
    await box.put("b")
    assert box.full()
    with pytest.raises(asyncio.QueueFull):
        box.put_nowait("x")
    waiting = [asyncio.create_task(box.put(name)) for name in ("c", "d")]
    await asyncio.sleep(0)
    assert not any(t.done() for t in waiting)
    assert [box.get_nowait(), box.get_nowait()] == ["a", "b"]  # each get lets one producer in
    await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [await box.get(), await box.get()] == ["c", "d"]


async def test_a_cancelled_producer_hands_its_turn_on() -> None:
    box: Mailbox[str] = Mailbox(1)
    box.put_nowait("a")
    first = asyncio.create_task(box.put("b"))
    second = asyncio.create_task(box.put("c"))
    await asyncio.sleep(0)
    box.get_nowait()  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs: `second` must get the free slot
    await asyncio.wait_for(second, 5)
    assert first.cancelled()
    assert box.get_nowait() == "c"
    assert box.empty()


async def test_a_mailbox_refuses_a_second_waiting_consumer() -> None:
    box: Mailbox[int] = Mailbox()
    first = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one consumer"):
        await box.get()
    box.put_nowait(7)
    assert await asyncio.wait_for(first, 5) == 7


async def test_flag_wakes_its_waiter_and_stays_set_until_cleared() -> None:
    flag = Flag()
    woken = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not woken.done()
    flag.set()
    await asyncio.wait_for(woken, 5)
    assert flag.is_set()
    await asyncio.wait_for(flag.wait(), 5)  # already set: returns at once
    flag.clear()
    again = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not again.done()
    flag.set()
    await eventually(again.done)


def test_they_are_much_smaller_than_asyncio_queue_and_event() -> None:
    def footprint(make: object) -> int:
        made = make()  # type: ignore[operator]
        return sys.getsizeof(made) + sum(
            sys.getsizeof(getattr(made, name))
            for name in getattr(type(made), "__slots__", ())
            if getattr(made, name, None) is not None
        )

    queue = asyncio.Queue[int]()
    queue_size = sys.getsizeof(queue) + sum(sys.getsizeof(v) for v in vars(queue).values())
    assert footprint(Mailbox) * 4 < queue_size
    event = asyncio.Event()
    event_size = sys.getsizeof(event) + sum(sys.getsizeof(v) for v in vars(event).values())
    assert footprint(Flag) * 4 < event_size

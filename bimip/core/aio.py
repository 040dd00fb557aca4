"""Small asyncio primitives for state kept per stream.

An idle device stream holds its queues and events for as long as the phone stays connected, and
asyncio's own are large: an `asyncio.Queue` is four 64-slot deques (its items, getters, putters
and the waiters of its `join` event), about 3 KB, and an `asyncio.Event` one deque, about 0.75 KB,
allocated up front whether or not anything ever waits. These keep a list and create a future
only while someone waits: about 0.1-0.2 KB each.

Waiting with a time limit: `async with asyncio.timeout(t)`, never `asyncio.wait_for` (ruff's
TID251 refuses it outside the tests). On Python 3.11, when the awaited thing completes in the same
loop turn as the waiting task is cancelled, wait_for returns the result and the cancellation is
lost: a stream's task that was told to stop goes on, and whoever waits for it hangs.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A FIFO queue with one consumer: `asyncio.Queue`'s `put`, `put_nowait`, `get`, `get_nowait`,
    `empty`, `full` and `qsize`, and `peek_nowait`, bounded by `maxsize` (0: unbounded). Any
    number of producers may wait in `put`; one task at a time may wait in `get` (a second raises
    RuntimeError)."""

    __slots__ = ("_getter", "_items", "_maxsize", "_putters")

    def __init__(self, maxsize: int = 0) -> None:
        self._items: list[T] = []
        self._maxsize = maxsize
        self._getter: asyncio.Future[None] | None = None
        self._putters: list[asyncio.Future[None]] | None = None  # only while producers wait

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self._maxsize <= len(self._items)

    def put_nowait(self, item: T) -> None:
        """Add `item`; raises asyncio.QueueFull when the mailbox is full."""
        if self.full():
            raise asyncio.QueueFull
        self._items.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def put(self, item: T) -> None:
        """Add `item`, waiting (in call order) while the mailbox is full."""
        while self.full():
            putter = asyncio.get_running_loop().create_future()
            if self._putters is None:
                self._putters = []
            self._putters.append(putter)
            try:
                await putter
            except BaseException:
                putter.cancel()
                if self._putters is not None and putter in self._putters:
                    self._putters.remove(putter)
                elif not putter.cancelled() and not self.full():
                    self._wake_putter()  # woken, then cancelled: hand the turn on
                raise
        self.put_nowait(item)

    def peek_nowait(self) -> T:
        """The oldest item, left in place; raises asyncio.QueueEmpty when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items[0]

    def get_nowait(self) -> T:
        """Remove and return the oldest item; raises asyncio.QueueEmpty when there is none."""
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.pop(0)
        if self._putters:
            self._wake_putter()
        return item

    async def get(self) -> T:
        """Remove and return the oldest item, waiting for one."""
        while not self._items:
            if self._getter is not None:
                raise RuntimeError("a Mailbox has one consumer; another task is already waiting")
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        return self.get_nowait()

    def _wake_putter(self) -> None:
        putters = self._putters
        while putters:
            putter = putters.pop(0)
            if not putter.done():
                putter.set_result(None)
                break
        if not putters:
            self._putters = None


class Flag:
    """`asyncio.Event`'s `set`, `clear`, `is_set` and `wait`, for one waiting task at a time."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is)."""
        if self._set:
            return
        if self._waiter is not None:
            raise RuntimeError("a Flag has one waiter; another task is already waiting")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

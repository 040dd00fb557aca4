"""What every service's streams share: the first frame is `open` and comes soon; work that must
run to its end even when a handler is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc

from bimip.core.errors import BimipError

F = TypeVar("F")  # a request message whose oneof is named `frame`


async def open_frame(requests: AsyncIterator[F], within: float) -> F | None:
    """The stream's first frame, which must be `open` and arrive within `within` seconds; None when
    the client closed the stream without sending anything. Raises FAILED_PRECONDITION /
    OPEN_REQUIRED otherwise."""
    try:
        async with asyncio.timeout(within):
            first = await anext(requests)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise BimipError(
            grpc.StatusCode.FAILED_PRECONDITION, "OPEN_REQUIRED", f"no `open` frame within {within:g} s"
        ) from None
    message: Any = first
    if message.WhichOneof("frame") != "open":
        raise BimipError(
            grpc.StatusCode.FAILED_PRECONDITION, "OPEN_REQUIRED", "the first frame of a stream must be `open`"
        )
    return first


T = TypeVar("T")


class RunToEnd:
    """Work that must finish even when the caller is cancelled — a stream's leaving, a database
    read (one cut off mid-query makes the driver tear its connection down) — and that shutdown
    waits for with `drain`."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        return await asyncio.shield(self.start(work))

    def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start `work` in the background; `drain` waits for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

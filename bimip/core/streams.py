"""What every client stream shares: its first frame must be `open`, and come soon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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

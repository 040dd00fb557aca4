"""The SDK's seq-matched asks stop when cancelled, even when the answer arrives in the same loop
turn (asyncio.wait_for loses that cancellation on Python 3.11; bimip.core.aio)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bimip.messaging.v1 import messaging_pb2
from bimip.sdk.frames import Frames


class _Call:
    """Stands in for the stream call: writes go nowhere, answers are handed in by the test."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.wrote = asyncio.Event()

    async def write(self, request: Any) -> None:
        self.written.append(request)
        self.wrote.set()


async def test_a_cancelled_ask_stops_even_when_its_answer_arrives_at_once() -> None:
    frames, call = Frames(), _Call()
    frames.call = call
    asking = asyncio.create_task(frames.ask(lambda seq: messaging_pb2.ConnectRequest(seq=seq)))
    await call.wrote.wait()  # the ask now waits for its answer
    (request,) = call.written
    assert frames.answered(messaging_pb2.ConnectResponse(seq=request.seq))
    asking.cancel()  # in the same turn as the answer
    with pytest.raises(asyncio.CancelledError):
        await asking


async def test_an_answered_ask_returns_its_answer() -> None:
    frames, call = Frames(), _Call()
    frames.call = call
    asking = asyncio.create_task(frames.ask(lambda seq: messaging_pb2.ConnectRequest(seq=seq)))
    await call.wrote.wait()  # the ask now waits for its answer
    answer = messaging_pb2.ConnectResponse(
        seq=call.written[0].seq, cursor=messaging_pb2.CursorUpdate(cursor=3)
    )
    frames.answered(answer)
    assert (await asking).cursor.cursor == 3

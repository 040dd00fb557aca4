"""The SDK's seq-matched asks stop when cancelled, even when the answer arrives in the same loop
turn (asyncio.wait_for loses that cancellation on Python 3.11; bimip.core.aio); its supervisor
reports a refusal that grpc.aio first disguised as INTERNAL."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from bimip.messaging.v1 import messaging_pb2
from bimip.sdk.frames import Frames, Supervisor


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


def _refusal(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


def _supervisor(outcomes: list[grpc.StatusCode], backoff: float) -> tuple[Supervisor, list[str]]:
    states: list[str] = []

    async def session(supervisor: Supervisor) -> None:
        raise _refusal(outcomes.pop(0))

    supervisor = Supervisor(
        "messaging", session, lambda _, state, __: states.append(state), (backoff, backoff), lambda: None
    )
    return supervisor, states


async def test_internal_before_the_stream_opens_is_asked_again_at_once() -> None:
    """grpc.aio says INTERNAL when the open frame's write races the server's refusal: the refusal
    itself must come out, with no backoff first and no "reconnecting"."""
    outcomes = [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAUTHENTICATED]
    supervisor, states = _supervisor(outcomes, backoff=60)
    async with asyncio.timeout(5):  # a backoff of 60 s would run past this
        await supervisor.run()
    assert supervisor.fatal is not None and supervisor.fatal.code == grpc.StatusCode.UNAUTHENTICATED
    assert not outcomes and "reconnecting" not in states


async def test_a_lasting_internal_falls_back_to_backoff() -> None:
    outcomes = [grpc.StatusCode.INTERNAL] * 3 + [grpc.StatusCode.UNAUTHENTICATED]
    supervisor, states = _supervisor(outcomes, backoff=0.01)
    async with asyncio.timeout(5):
        await supervisor.run()
    assert not outcomes  # two quick retries, then one backoff, then the refusal
    assert states == ["reconnecting", "closed"]

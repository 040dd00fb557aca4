"""The device's awareness stream inside the SDK: open while the client runs (the device is
ONLINE), reconnected on its own, heartbeating, and turning frames into events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.awareness.v1 import awareness_pb2_grpc
from bimip.common.v1 import common_pb2
from bimip.sdk.events import (
    AwarenessEvent,
    IntentChanged,
    PresenceChanged,
    VisibilityChanged,
    awareness_event,
)
from bimip.sdk.frames import ANSWER_TIMEOUT_S, ConnectionLost, Frames, Supervisor


class AwarenessSession:
    """What the stream knows: the presence of every user this user is subscribed to, and this
    user's own intent and visibility."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...],
        emit: Callable[[AwarenessEvent], None],
    ) -> None:
        self.stub = awareness_pb2_grpc.AwarenessServiceStub(channel)
        self._metadata = metadata
        self._emit = emit
        self.frames = Frames()
        self.presences: dict[str, PresenceChanged] = {}
        self.intent: aw.Status.ValueType = aw.STATUS_ONLINE
        self.hidden = False

    def _event(self, event: AwarenessEvent | None) -> None:
        if isinstance(event, PresenceChanged):
            if self.presences.get(event.eid) == event:
                return  # the same presence again (a reconnect's opening list)
            self.presences[event.eid] = event
        elif isinstance(event, IntentChanged):
            self.intent = event.intent
        elif isinstance(event, VisibilityChanged):
            self.hidden = event.hidden
        if event is not None:
            self._emit(event)

    async def session(self, supervisor: Supervisor) -> None:
        call: Any = self.stub.Connect(metadata=self._metadata)
        try:
            await call.write(aw.ConnectRequest(open=aw.OpenRequest()))
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                first = await call.read()
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
                raise ConnectionLost("the awareness service did not open the stream")
            opened = first.opened
            self.intent, self.hidden = opened.intent, opened.hidden
            for presence in opened.presences:
                self._event(awareness_event(aw.ConnectResponse(presence=presence)))
            self.frames.call = call
            supervisor.up()
            beats = asyncio.create_task(self._heartbeats(opened.heartbeat_interval_ms / 1000))
            try:
                while (frame := await call.read()) is not grpc.aio.EOF:
                    if not self.frames.answered(frame):
                        self._event(awareness_event(frame))
            finally:
                beats.cancel()
                await asyncio.gather(beats, return_exceptions=True)
        finally:
            call.cancel()

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.frames.ask(lambda seq: aw.ConnectRequest(seq=seq, heartbeat=common_pb2.Heartbeat()))

    async def activity(self, status: aw.Status.ValueType, peer: str, after_offset: int = 0) -> None:
        await self.frames.ask(
            lambda seq: aw.ConnectRequest(
                seq=seq, activity=aw.ActivityRequest(status=status, peer_eid=peer, after_offset=after_offset)
            )
        )

"""Awareness streams on one replica and their one bus subscription (SPEC A1–A7).

A stream listens to its own user's channel (intent, visibility, subscription changes, activities
aimed at the user, "a newer stream for this device opened") and to the presence channels of the
users its user is an approved subscriber of. Activities it sends expire on their own: a timer per
(peer) sends the stop (PAUSED) to the peer when it runs out, when the device stops, or when the
stream closes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from typing import Any

import grpc
from opentelemetry.trace import Tracer

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.common.v1 import common_pb2
from bimip.core.clock import Clock, timestamp
from bimip.core.errors import BimipError
from bimip.core.metrics import Metrics
from bimip.core.pubsub import Bus, BusMessage, Subscription, consumer_span
from services.awareness.presence import presence_channel, user_channel

log = logging.getLogger(__name__)


class AwarenessStream:
    _ids = itertools.count(1)

    def __init__(self, hub: StreamHub, eid: str, device_id: str, clock: Clock) -> None:
        self.hub = hub
        self.eid = eid
        self.device_id = device_id
        self.clock = clock
        self.sid = f"{hub.replica}/{next(self._ids)}"
        self.opened = (time.time_ns(), self.sid)
        self.out: asyncio.Queue[aw.ConnectResponse | BimipError | None] = asyncio.Queue()
        self.targets: set[str] = set()
        self.timers: dict[str, asyncio.Task[None]] = {}
        self.closed = False

    def push(self, frame: aw.ConnectResponse) -> None:
        if not self.closed:
            self.out.put_nowait(frame)

    def end(self, error: BimipError | None) -> None:
        if not self.closed:
            self.closed = True
            self.out.put_nowait(error)


EVENT_KINDS = ("presence", "intent", "visibility", "activity", "subscription")


class StreamHub:
    def __init__(self, bus: Bus, replica: str, tracer: Tracer, metrics: Metrics | None = None) -> None:
        self.bus = bus
        self.replica = replica
        self.tracer = tracer
        self.metrics = metrics or Metrics()
        delivered = self.metrics.awareness_delivered
        self._delivered = {kind: delivered.labels(kind) for kind in EVENT_KINDS}
        self.by_user: dict[str, set[AwarenessStream]] = {}
        self.watchers: dict[str, set[AwarenessStream]] = {}  # target eid -> streams watching it
        self._subscription: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._subscription = await self.bus.subscribe()
        self._reader = asyncio.create_task(self._read(), name="awareness-hub")

    async def stop(self) -> None:
        for streams in list(self.by_user.values()):
            for stream in list(streams):
                stream.end(
                    BimipError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down")
                )
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()

    async def register(self, stream: AwarenessStream, targets: set[str]) -> None:
        async with self._lock:
            assert self._subscription is not None
            self.by_user.setdefault(stream.eid, set()).add(stream)
            await self._subscription.add(user_channel(stream.eid))
            await self.watch(stream, targets)
        at, sid = stream.opened
        event = {"t": "open", "device": stream.device_id, "at": at, "sid": sid}
        await self.bus.publish(user_channel(stream.eid), json.dumps(event).encode())

    async def watch(self, stream: AwarenessStream, targets: set[str]) -> None:
        assert self._subscription is not None
        new = [t for t in targets if t not in stream.targets]
        stream.targets.update(new)
        for target in new:
            self.watchers.setdefault(target, set()).add(stream)
        if new:
            await self._subscription.add(*(presence_channel(t) for t in new))

    async def unwatch(self, stream: AwarenessStream, target: str) -> None:
        stream.targets.discard(target)
        watchers = self.watchers.get(target)
        if watchers is not None:
            watchers.discard(stream)
            if not watchers:
                del self.watchers[target]
                if self._subscription is not None and not self._subscription.closed:
                    await self._subscription.remove(presence_channel(target))

    async def unregister(self, stream: AwarenessStream) -> None:
        async with self._lock:
            for target in list(stream.targets):
                await self.unwatch(stream, target)
            users = self.by_user.get(stream.eid)
            if users is not None:
                users.discard(stream)
                if not users:
                    del self.by_user[stream.eid]
                    if self._subscription is not None and not self._subscription.closed:
                        await self._subscription.remove(user_channel(stream.eid))

    async def _read(self) -> None:
        assert self._subscription is not None
        async for message in self._subscription:
            try:
                # X6: the delivery joins the trace of the event that published it.
                with consumer_span(self.tracer, message, "awareness deliver") as span:
                    span.set_attribute("bimip.replica", self.replica)
                    await self._dispatch(message)
            except Exception:
                log.warning("awareness hub: dropped a message on %s", message.channel, exc_info=True)

    async def _dispatch(self, message: BusMessage) -> None:
        if message.channel.startswith("aw-presence:"):
            presence = aw.Presence.FromString(message.body)
            watchers = list(self.watchers.get(presence.eid, ()))
            for stream in watchers:
                stream.push(aw.ConnectResponse(presence=presence))
            if watchers:
                self._delivered["presence"].inc(len(watchers))
        elif message.channel.startswith("aw-user:"):
            eid = message.channel[len("aw-user:") :]
            event = json.loads(message.body)
            streams = list(self.by_user.get(eid, ()))
            for stream in streams:
                await self._user_event(stream, event)
            if streams and (counter := self._delivered.get(event.get("t"))) is not None:
                counter.inc(len(streams))

    async def _user_event(self, stream: AwarenessStream, event: dict[str, Any]) -> None:
        kind = event.get("t")
        if kind == "open":
            if event.get("device") == stream.device_id and (event["at"], event["sid"]) > stream.opened:
                stream.end(
                    BimipError(
                        grpc.StatusCode.ABORTED,
                        "CONNECTED_ELSEWHERE",
                        "a newer stream for this device replaced this one",
                    )
                )
        elif kind == "intent":
            by = common_pb2.Identity(eid=event["by"][0], device_id=event["by"][1])
            stream.push(aw.ConnectResponse(intent=aw.IntentUpdate(intent=event["intent"], set_by=by)))
        elif kind == "visibility":
            by = common_pb2.Identity(eid=event["by"][0], device_id=event["by"][1])
            stream.push(aw.ConnectResponse(visibility=aw.VisibilityUpdate(hidden=event["hidden"], set_by=by)))
        elif kind == "activity":
            by = common_pb2.Identity(eid=event["by"][0], device_id=event["by"][1])
            activity = aw.Activity(by=by, status=event["status"])
            if event.get("expires"):
                activity.expires_at.FromMilliseconds(int(event["expires"]))
            stream.push(aw.ConnectResponse(activity=activity))
        elif kind == "subscription":
            subscription = aw.Subscription(
                subscriber_eid=event["subscriber"], target_eid=event["target"], state=event["state"]
            )
            subscription.updated_at.CopyFrom(timestamp(stream.clock.now()))
            stream.push(aw.ConnectResponse(subscription=aw.SubscriptionEvent(subscription=subscription)))
            if event["subscriber"] == stream.eid:
                if event["state"] == aw.SUBSCRIPTION_STATE_APPROVED:
                    await self.watch(stream, {event["target"]})
                    # A1/A6: the new subscriber receives the current presence at once.
                    if (presence := event.get("presence")) is not None:
                        stream.push(
                            aw.ConnectResponse(presence=aw.Presence.FromString(bytes.fromhex(presence)))
                        )
                else:
                    await self.unwatch(stream, event["target"])

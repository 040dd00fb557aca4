"""gRPC face of the awareness service: subscriptions and blocks (A6), and the Connect stream with
presence, intent, visibility and activity (A1–A5, A7)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bimip.awareness.v1 import awareness_pb2, awareness_pb2_grpc
from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.common.v1 import common_pb2
from bimip.core.auth import current_principal
from bimip.core.clock import Clock, timestamp
from bimip.core.errors import BimipError, answer, invalid
from bimip.core.streams import RunToEnd, open_frame
from bimip.messaging.v1 import internal_pb2
from services.awareness.config import AwarenessSettings
from services.awareness.presence import INTENTS, Presence, user_channel
from services.awareness.streams import AwarenessStream, StreamHub
from services.awareness.subscriptions import Subscriptions, check_other
from services.links import PresenceLink

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class AwarenessServicer(awareness_pb2_grpc.AwarenessServiceServicer):
    """Presence, intent, activity and subscriptions (SPEC §2)."""

    def __init__(self, subscriptions: Subscriptions, streams: AwarenessStreams) -> None:
        self.subscriptions = subscriptions
        self.streams = streams

    def Connect(
        self, request_iterator: AsyncIterator[aw.ConnectRequest], context: Context
    ) -> AsyncIterator[aw.ConnectResponse]:
        return self.streams.connect(request_iterator, context)

    async def SetIntent(self, request: aw.SetIntentRequest, context: Context) -> aw.SetIntentResponse:
        principal = current_principal()

        async def work() -> aw.SetIntentResponse:
            intent = check_intent(request.intent)
            await self.streams.presence.set_intent(
                principal.eid, intent, (principal.eid, principal.device_id)
            )
            return aw.SetIntentResponse(intent=aw.Status.ValueType(intent))

        return await answer(work(), context)

    async def SetVisibility(
        self, request: aw.SetVisibilityRequest, context: Context
    ) -> aw.SetVisibilityResponse:
        principal = current_principal()
        await self.streams.presence.set_hidden(
            principal.eid, request.hidden, (principal.eid, principal.device_id)
        )
        return aw.SetVisibilityResponse(hidden=request.hidden)

    async def RequestSubscription(
        self, request: awareness_pb2.RequestSubscriptionRequest, context: Context
    ) -> awareness_pb2.RequestSubscriptionResponse:
        caller = current_principal().eid
        subscription = await answer(self.subscriptions.request(caller, request.target_eid), context)
        return awareness_pb2.RequestSubscriptionResponse(subscription=subscription)

    async def ApproveSubscription(
        self, request: awareness_pb2.ApproveSubscriptionRequest, context: Context
    ) -> awareness_pb2.ApproveSubscriptionResponse:
        caller = current_principal().eid
        subscription = await answer(
            self.subscriptions.answer(caller, request.subscriber_eid, approve=True), context
        )
        return awareness_pb2.ApproveSubscriptionResponse(subscription=subscription)

    async def DenySubscription(
        self, request: awareness_pb2.DenySubscriptionRequest, context: Context
    ) -> awareness_pb2.DenySubscriptionResponse:
        caller = current_principal().eid
        subscription = await answer(
            self.subscriptions.answer(caller, request.subscriber_eid, approve=False), context
        )
        return awareness_pb2.DenySubscriptionResponse(subscription=subscription)

    async def Unsubscribe(
        self, request: awareness_pb2.UnsubscribeRequest, context: Context
    ) -> awareness_pb2.UnsubscribeResponse:
        await answer(self.subscriptions.unsubscribe(current_principal().eid, request.target_eid), context)
        return awareness_pb2.UnsubscribeResponse()

    async def Block(
        self, request: awareness_pb2.BlockRequest, context: Context
    ) -> awareness_pb2.BlockResponse:
        await answer(self.subscriptions.block(current_principal().eid, request.eid, blocked=True), context)
        return awareness_pb2.BlockResponse()

    async def Unblock(
        self, request: awareness_pb2.UnblockRequest, context: Context
    ) -> awareness_pb2.UnblockResponse:
        await answer(self.subscriptions.block(current_principal().eid, request.eid, blocked=False), context)
        return awareness_pb2.UnblockResponse()

    async def ListSubscriptions(
        self, request: awareness_pb2.ListSubscriptionsRequest, context: Context
    ) -> awareness_pb2.ListSubscriptionsResponse:
        return await answer(self.subscriptions.list(current_principal().eid), context)


class AwarenessStreams:
    """The Connect stream, SetIntent and SetVisibility (A1–A5, A7)."""

    def __init__(
        self,
        settings: AwarenessSettings,
        clock: Clock,
        hub: StreamHub,
        presence: Presence,
        subscriptions: Subscriptions,
        link: PresenceLink,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.hub = hub
        self.presence = presence
        self.subscriptions = subscriptions
        self.link = link
        self.leaving = RunToEnd()
        metrics = hub.metrics
        self._open = metrics.open_streams.labels("awareness", "connect")
        self._subscription_events = metrics.awareness_published.labels("subscription")
        self._activity_events = metrics.awareness_published.labels("activity")

    async def subscription_changed(self, subscriber: str, target: str, state: int) -> None:
        """Tell both users' devices; an approval carries the target's presence (A6)."""
        event: dict[str, Any] = {
            "t": "subscription",
            "subscriber": subscriber,
            "target": target,
            "state": state,
        }
        for eid in (subscriber, target):
            body = dict(event)
            if eid == subscriber and state == APPROVED:
                body["presence"] = (await self.presence.visible(target)).SerializeToString().hex()
            await self.hub.bus.publish(user_channel(eid), json.dumps(body).encode())
            self._subscription_events.inc()

    async def connect(
        self, requests: AsyncIterator[aw.ConnectRequest], context: Context
    ) -> AsyncIterator[aw.ConnectResponse]:
        principal = current_principal()
        eid, device_id = principal.eid, principal.device_id
        try:
            first = await open_frame(requests, self.settings.heartbeat_interval_s * 3)
        except BimipError as err:
            await err.abort(context)
        if first is None:
            return
        stream = AwarenessStream(self.hub, eid, device_id, self.clock)
        tasks: list[asyncio.Task[Any]] = []
        targets = await self.subscriptions.approved_targets(eid)
        self._open.inc()
        try:
            # Online first, under this stream: the older stream this one replaces then leaves no gap.
            await self.presence.device_online(eid, device_id, stream.sid, self._deadline())
            await self.hub.register(stream, targets)
            try:  # A2, M11: messaging pushes the device's pending entries
                await self.link.send(
                    device_online=internal_pb2.DeviceOnline(device=_identity(eid, device_id))
                )
            except BimipError as err:
                log.warning(
                    "awareness: messaging not told that %s/%s is online: %s", eid, device_id, err.reason
                )
            state = await self.presence.user(eid)
            opened = aw.OpenResponse(
                heartbeat_interval_ms=int(self.settings.heartbeat_interval_s * 1000),
                presence_ttl_ms=int(self.settings.presence_ttl_s * 1000),
                intent=aw.Status.ValueType(state.intent or ONLINE),
                hidden=state.hidden,
            )
            for target in sorted(targets):
                opened.presences.append(await self.presence.visible(target))
            yield aw.ConnectResponse(seq=first.seq, opened=opened)
            tasks = [
                asyncio.create_task(self._read(stream, requests)),
                asyncio.create_task(self._heartbeat(stream)),
            ]
            while True:
                item = await stream.out.get()
                if item is None:
                    return
                if isinstance(item, BimipError):
                    await item.abort(context)
                yield item
        finally:
            self._open.dec()
            # The leaving runs in a task of its own: a handler cancelled again while it waits must
            # not leave the device ONLINE (A5) or a peer "typing" (A3).
            with contextlib.suppress(asyncio.CancelledError):
                await self.leaving.run(self._leave(stream, tasks))

    async def _leave(self, stream: AwarenessStream, tasks: list[asyncio.Task[Any]]) -> None:
        stream.closed = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            for peer, timer in list(stream.timers.items()):
                timer.cancel()
                await self._activity(stream, peer, PAUSED)  # A3: the peer is not left "typing"
            await self.hub.unregister(stream)
            await self.presence.device_offline(stream.eid, stream.device_id, stream.sid)
        except Exception:
            log.warning(
                "awareness: %s/%s left without its offline being published",
                stream.eid,
                stream.device_id,
                exc_info=True,
            )

    def _deadline(self) -> float:
        return self.clock.now().timestamp() + self.settings.presence_ttl_s

    async def sweep_forever(self) -> None:
        """A5: devices past their deadline go OFFLINE, whichever replica held them (a dead one
        included); a stream of this replica whose heartbeats stopped is ended."""
        interval = min(1.0, self.settings.presence_ttl_s / 4)
        while True:
            await self.clock.sleep(interval)
            try:
                for eid, device_id, sid in await self.presence.devices.expired(self.clock.now().timestamp()):
                    await self.presence.device_offline(eid, device_id, sid)
                    for stream in list(self.hub.by_user.get(eid, ())):
                        if stream.sid == sid:
                            stream.end(
                                BimipError(
                                    grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "HEARTBEAT_TIMEOUT",
                                    "no heartbeat within the presence TTL",
                                )
                            )
            except Exception:
                log.warning("awareness: presence sweep failed", exc_info=True)

    async def _heartbeat(self, stream: AwarenessStream) -> None:
        while not stream.closed:
            await self.clock.sleep(self.settings.heartbeat_interval_s)
            stream.push(
                aw.ConnectResponse(heartbeat=common_pb2.Heartbeat(sent_at=timestamp(self.clock.now())))
            )

    async def _read(self, stream: AwarenessStream, requests: AsyncIterator[aw.ConnectRequest]) -> None:
        try:
            async for request in requests:
                try:
                    await self._frame(stream, request)
                    if request.WhichOneof("frame") == "heartbeat":  # answered in kind, by its seq
                        now = timestamp(self.clock.now())
                        stream.push(
                            aw.ConnectResponse(seq=request.seq, heartbeat=common_pb2.Heartbeat(sent_at=now))
                        )
                    else:
                        stream.push(aw.ConnectResponse(seq=request.seq, ack=aw.FrameAck()))
                except BimipError as err:
                    stream.push(aw.ConnectResponse(seq=request.seq, error=err.to_proto()))
        except grpc.aio.AioRpcError:
            pass
        stream.end(None)

    async def _frame(self, stream: AwarenessStream, request: aw.ConnectRequest) -> None:
        which = request.WhichOneof("frame")
        by = (stream.eid, stream.device_id)
        if which == "intent":
            await self.presence.set_intent(stream.eid, check_intent(request.intent.intent), by)
        elif which == "visibility":
            await self.presence.set_hidden(stream.eid, request.visibility.hidden, by)
        elif which == "activity":
            await self._activity_frame(stream, request.activity)
        elif which == "heartbeat":  # A5: the device stays online for another TTL
            await self.presence.devices.refresh(stream.eid, stream.device_id, stream.sid, self._deadline())
        elif which == "open":
            raise BimipError(
                grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_OPEN", "the stream is already open"
            )
        else:
            raise invalid("FRAME_EMPTY", "the frame carries nothing (unknown or missing frame)")

    async def _activity_frame(self, stream: AwarenessStream, activity: aw.ActivityRequest) -> None:
        status, peer = activity.status, activity.peer_eid
        if status not in (TYPING, RECORDING, PAUSED, RESUME):
            raise invalid(
                "INVALID_STATUS", f"an activity is TYPING, RECORDING, PAUSED or RESUME, not {int(status)}"
            )
        if not peer:
            raise invalid("PEER_REQUIRED", "an activity names the conversation's peer", field="peer_eid")
        check_other(stream.eid, peer, "peer_eid")
        if status == RESUME:  # A4: to the user's own side only, as a replay by messaging
            if activity.after_offset < 0:
                raise invalid("INVALID_OFFSET", "after_offset must not be negative", field="after_offset")
            resume = internal_pb2.ResumeConversation(
                device=_identity(stream.eid, stream.device_id),
                peer_eid=peer,
                after_offset=activity.after_offset,
            )
            await self.link.send(resume=resume)
            return
        why = await self.subscriptions.may_see(peer, stream.eid)
        if why is not None:
            raise BimipError(
                grpc.StatusCode.PERMISSION_DENIED,
                why,
                "activity reaches only an approved subscriber, and not across a block",
            )
        if (await self.presence.user(stream.eid)).hidden:
            return  # A7: dropped silently, hiding must not be detectable
        timer = stream.timers.pop(peer, None)
        if timer is not None:
            timer.cancel()
        if status == PAUSED:
            await self._activity(stream, peer, PAUSED)
            return
        ttl = self.settings.typing_ttl_s if status == TYPING else self.settings.recording_ttl_s
        await self._activity(stream, peer, status, ttl)
        stream.timers[peer] = asyncio.create_task(self._expire(stream, peer, ttl))

    async def _expire(self, stream: AwarenessStream, peer: str, ttl: float) -> None:
        await self.clock.sleep(ttl)
        stream.timers.pop(peer, None)
        await self._activity(stream, peer, PAUSED)

    async def _activity(self, stream: AwarenessStream, peer: str, status: int, ttl: float = 0) -> None:
        event: dict[str, Any] = {"t": "activity", "by": [stream.eid, stream.device_id], "status": status}
        if ttl:
            event["expires"] = int((self.clock.now().timestamp() + ttl) * 1000)
        await self.hub.bus.publish(user_channel(peer), json.dumps(event).encode())
        self._activity_events.inc()


ONLINE, TYPING, RECORDING = aw.STATUS_ONLINE, aw.STATUS_TYPING, aw.STATUS_RECORDING
RESUME, PAUSED = aw.STATUS_RESUME, aw.STATUS_PAUSED
APPROVED = aw.SUBSCRIPTION_STATE_APPROVED


def check_intent(intent: int) -> int:
    if intent not in (*INTENTS, ONLINE):
        raise invalid(
            "INVALID_INTENT", f"an intent is AWAY, BUSY or DND (ONLINE clears it), not {int(intent)}"
        )
    return intent


def _identity(eid: str, device_id: str) -> common_pb2.Identity:
    return common_pb2.Identity(eid=eid, device_id=device_id)

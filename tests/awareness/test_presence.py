"""Presence, intent, visibility and activity (SPEC A1–A5, A7) and public scenario 6, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.awareness.v1 import awareness_pb2_grpc
from bimip.core.clock import FakeClock
from bimip.core.errors import reason_of
from tests.conftest import Backend
from tests.helpers import eventually
from tests.streams import RecordedCall
from tests.suite import Suite, running_suite

A, S, N = "alice@example.com", "sam@example.com", "nora@example.com"
ONLINE, OFFLINE, DND = aw.STATUS_ONLINE, aw.STATUS_OFFLINE, aw.STATUS_DND
TYPING, PAUSED = aw.STATUS_TYPING, aw.STATUS_PAUSED


class Stream(RecordedCall):
    """One device's open awareness stream, recording what arrives."""

    def __init__(self, call: Any, opened: aw.OpenResponse) -> None:
        super().__init__(call)
        self.opened = opened

    def presences(self, eid: str) -> list[int]:
        return [p.status for p in self.of("presence") if p.eid == eid]

    async def ask(self, **frame: Any) -> aw.ConnectResponse:
        seq = next(self._seq)
        await self.call.write(aw.ConnectRequest(seq=seq, **frame))
        return await eventually(  # type: ignore[no-any-return]
            lambda: next(
                (
                    f
                    for f in self.frames
                    if f.seq == seq and f.WhichOneof("frame") in ("ack", "error", "heartbeat")
                ),
                None,
            ),
            timeout=15,
        )

    async def close(self) -> None:
        await self.stop_reading()


async def open_stream(suite: Suite, channel: grpc.aio.Channel, eid: str, device: str) -> Stream:
    stub = awareness_pb2_grpc.AwarenessServiceStub(channel)
    call = stub.Connect(metadata=(("authorization", f"Bearer {suite.token(eid, device)}"),))
    await call.write(aw.ConnectRequest(open=aw.OpenRequest()))
    first = await call.read()
    assert first.WhichOneof("frame") == "opened", first
    return Stream(call, first.opened)


async def unary(suite: Suite, channel: grpc.aio.Channel, eid: str, method: str, request: Any) -> Any:
    stub = awareness_pb2_grpc.AwarenessServiceStub(channel)
    return await getattr(stub, method)(
        request, metadata=(("authorization", f"Bearer {suite.token(eid, 'x')}"),)
    )


async def subscribe(suite: Suite, channel: grpc.aio.Channel, subscriber: str, target: str) -> None:
    await unary(
        suite, channel, subscriber, "RequestSubscription", aw.RequestSubscriptionRequest(target_eid=target)
    )
    await unary(
        suite,
        channel,
        target,
        "ApproveSubscription",
        aw.ApproveSubscriptionRequest(subscriber_eid=subscriber),
    )


@pytest.fixture
async def env(backend: Backend, tmp_path: Path) -> AsyncIterator[tuple[Suite, grpc.aio.Channel, FakeClock]]:
    clock = FakeClock()
    async with running_suite(backend, tmp_path, ["messaging", "awareness"], clock=clock) as suite:
        async with suite.channel("awareness") as channel:
            yield suite, channel, clock


async def test_scenario_6_presence_and_typing(env: tuple[Suite, grpc.aio.Channel, FakeClock]) -> None:
    """A's subscriber S sees ONLINE, then DND, then OFFLINE with last seen; a non-subscriber sees
    nothing; TYPING reaches only the conversation peer and expires on its own."""
    suite, channel, clock = env
    await subscribe(suite, channel, S, A)  # S sees A
    await subscribe(suite, channel, A, S)  # and A sees S, so A may type to S (A3)
    s1 = await open_stream(suite, channel, S, "s1")
    n1 = await open_stream(suite, channel, N, "n1")
    assert [(p.eid, p.status) for p in s1.opened.presences] == [(A, OFFLINE)]
    a1 = await open_stream(suite, channel, A, "a1")
    a2 = await open_stream(suite, channel, A, "a2")
    try:
        await eventually(lambda: s1.presences(A) == [ONLINE])
        assert (await a1.ask(intent=aw.IntentRequest(intent=DND))).WhichOneof("frame") == "ack"
        await eventually(lambda: s1.presences(A) == [ONLINE, DND])
        await eventually(lambda: [i.intent for i in a2.of("intent")] == [DND])  # mirrored to A's devices

        typing = await a1.ask(activity=aw.ActivityRequest(status=TYPING, peer_eid=S))
        assert typing.WhichOneof("frame") == "ack"
        await eventually(lambda: [x.status for x in s1.of("activity")] == [TYPING])
        assert s1.of("activity")[0].by.eid == A and s1.of("activity")[0].HasField("expires_at")
        assert not a2.of("activity") and not n1.of("activity")  # not to the typer's other devices
        await clock.advance(6.5)  # nobody is left typing: the stop comes by itself
        await eventually(lambda: [x.status for x in s1.of("activity")] == [TYPING, PAUSED])

        refused = await n1.ask(activity=aw.ActivityRequest(status=TYPING, peer_eid=A))
        assert (refused.error.code, refused.error.reason) == (
            grpc.StatusCode.PERMISSION_DENIED.value[0],
            "NOT_SUBSCRIBED",
        )
    finally:
        await a1.close()
        await a2.close()
    await eventually(lambda: s1.presences(A)[-1:] == [OFFLINE])
    last = [p for p in s1.of("presence") if p.eid == A][-1]
    assert last.HasField("last_seen")
    assert s1.presences(A) == [ONLINE, DND, OFFLINE]  # only changes, each once
    assert not n1.of("presence")  # a non-subscriber sees nothing
    await s1.close()
    await n1.close()


async def test_second_device_and_replacement_change_nothing(
    env: tuple[Suite, grpc.aio.Channel, FakeClock],
) -> None:
    suite, channel, _ = env
    await subscribe(suite, channel, S, A)
    s1 = await open_stream(suite, channel, S, "s1")
    a1 = await open_stream(suite, channel, A, "a1")
    await eventually(lambda: s1.presences(A) == [ONLINE])
    replacement = await open_stream(suite, channel, A, "a1")  # M7 for awareness: no presence change
    await eventually(lambda: a1.finished)
    assert a1.ended is not None and reason_of(a1.ended) == "CONNECTED_ELSEWHERE"
    other = await open_stream(suite, channel, A, "a2")
    await other.close()  # one of two devices leaves: A is still online
    await replacement.ask(intent=aw.IntentRequest(intent=DND))
    await eventually(lambda: s1.presences(A)[-1:] == [DND])
    await replacement.close()
    await eventually(lambda: s1.presences(A)[-1:] == [OFFLINE])
    # Neither the replacement nor the second device's exit showed as a change: only these did.
    assert s1.presences(A) == [ONLINE, DND, OFFLINE]
    await a1.close()
    await s1.close()


async def test_intent_outlives_disconnects_and_hidden_users_show_offline(
    env: tuple[Suite, grpc.aio.Channel, FakeClock],
) -> None:
    suite, channel, _ = env
    await subscribe(suite, channel, S, A)
    await subscribe(suite, channel, A, S)
    assert (
        await unary(suite, channel, A, "SetIntent", aw.SetIntentRequest(intent=aw.STATUS_BUSY))
    ).intent == aw.STATUS_BUSY
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(suite, channel, A, "SetIntent", aw.SetIntentRequest(intent=aw.STATUS_TYPING))
    assert reason_of(err.value) == "INVALID_INTENT"
    s1 = await open_stream(suite, channel, S, "s1")
    a1 = await open_stream(suite, channel, A, "a1")
    assert a1.opened.intent == aw.STATUS_BUSY  # set with no device online, shown once one is
    await eventually(lambda: s1.presences(A) == [aw.STATUS_BUSY])
    assert (await a1.ask(visibility=aw.VisibilityRequest(hidden=True))).WhichOneof("frame") == "ack"
    await eventually(lambda: s1.presences(A) == [aw.STATUS_BUSY, OFFLINE])
    assert not [p for p in s1.of("presence") if p.eid == A][-1].HasField("last_seen")
    await eventually(lambda: [v.hidden for v in a1.of("visibility")] == [True])  # confirmation
    # A hidden user's typing is dropped silently: acknowledged, never forwarded.
    assert (await a1.ask(activity=aw.ActivityRequest(status=TYPING, peer_eid=S))).WhichOneof("frame") == "ack"
    await a1.ask(visibility=aw.VisibilityRequest(hidden=False))
    await eventually(lambda: s1.presences(A) == [aw.STATUS_BUSY, OFFLINE, aw.STATUS_BUSY])
    assert not s1.of("activity")
    await a1.close()
    await s1.close()


async def test_bad_frames(env: tuple[Suite, grpc.aio.Channel, FakeClock]) -> None:
    suite, channel, _ = env
    a1 = await open_stream(suite, channel, A, "a1")
    cases = [
        (dict(activity=aw.ActivityRequest(status=aw.STATUS_ONLINE, peer_eid=S)), "INVALID_STATUS"),
        (dict(activity=aw.ActivityRequest(status=42, peer_eid=S)), "INVALID_STATUS"),
        (dict(activity=aw.ActivityRequest(status=TYPING)), "PEER_REQUIRED"),
        (dict(activity=aw.ActivityRequest(status=TYPING, peer_eid="nope")), "INVALID_EID"),
        (dict(activity=aw.ActivityRequest(status=TYPING, peer_eid=A)), "SELF_SUBSCRIPTION"),
        (dict(activity=aw.ActivityRequest(status=TYPING, peer_eid=S)), "NOT_SUBSCRIBED"),
        (dict(intent=aw.IntentRequest(intent=aw.STATUS_OFFLINE)), "INVALID_INTENT"),
        (dict(open=aw.OpenRequest()), "ALREADY_OPEN"),
        ({}, "FRAME_EMPTY"),
    ]
    for frame, reason in cases:
        answer = await a1.ask(**frame)
        assert answer.error.reason == reason, (frame, answer)
    assert not a1.finished  # per-frame refusals: the stream goes on
    await a1.close()


async def test_approval_shows_the_current_presence_at_once(
    env: tuple[Suite, grpc.aio.Channel, FakeClock],
) -> None:
    """A1/A6: nothing changed, yet the new subscriber learns A's presence when A approves."""
    suite, channel, _ = env
    a1 = await open_stream(suite, channel, A, "a1")
    await a1.ask(intent=aw.IntentRequest(intent=aw.STATUS_AWAY))
    s1 = await open_stream(suite, channel, S, "s1")
    assert not s1.opened.presences
    await unary(suite, channel, S, "RequestSubscription", aw.RequestSubscriptionRequest(target_eid=A))
    await eventually(
        lambda: [e.subscription.state for e in a1.of("subscription")] == [aw.SUBSCRIPTION_STATE_PENDING]
    )
    await unary(suite, channel, A, "ApproveSubscription", aw.ApproveSubscriptionRequest(subscriber_eid=S))
    await eventually(lambda: s1.presences(A) == [aw.STATUS_AWAY])
    assert aw.SUBSCRIPTION_STATE_APPROVED in [e.subscription.state for e in s1.of("subscription")]
    # From now on S hears A's changes; after a denial it hears nothing more.
    await a1.ask(intent=aw.IntentRequest(intent=aw.STATUS_ONLINE))
    await eventually(lambda: s1.presences(A) == [aw.STATUS_AWAY, ONLINE])
    await unary(suite, channel, A, "DenySubscription", aw.DenySubscriptionRequest(subscriber_eid=S))
    await eventually(
        lambda: aw.SUBSCRIPTION_STATE_DENIED in [e.subscription.state for e in s1.of("subscription")]
    )
    await a1.ask(intent=aw.IntentRequest(intent=DND))
    await s1.ask(heartbeat=aw.ConnectRequest().heartbeat)
    await a1.close()
    await s1.ask(heartbeat=aw.ConnectRequest().heartbeat)
    assert s1.presences(A) == [aw.STATUS_AWAY, ONLINE]
    await s1.close()

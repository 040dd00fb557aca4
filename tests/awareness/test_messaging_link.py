"""A2, A4, M11 end to end: an awareness stream opening makes messaging push the device's pending
entries; RESUME makes messaging replay one conversation on the device's messaging stream."""

from __future__ import annotations

from pathlib import Path

import grpc

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.core.clock import FakeClock
from tests.awareness.test_presence import open_stream, subscribe
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import devices, message
from tests.suite import running_suite

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"


async def test_online_flushes_pending_and_resume_replays(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()  # the grace period never passes by itself: only ONLINE can resend
    async with running_suite(backend, tmp_path, ["messaging", "awareness"], clock=clock) as suite:
        async with devices(suite, f"{A}/a1", f"{B}/b1", f"{C}/c1") as (a1, b1, c1):
            await a1.sent(message(B, "from-a"))
            await c1.sent(message(B, "from-c"))
            await b1.wait_entries(2)
            async with suite.channel("awareness") as channel:
                b_aw = await open_stream(suite, channel, B, "b1")  # B1 comes ONLINE in awareness
                await b1.wait_for(lambda: len(b1.deliveries) == 4)
                assert [(d.entry.offset, d.redelivery) for d in b1.deliveries[2:]] == [(1, True), (2, True)]
                resumed = await b_aw.ask(activity=aw.ActivityRequest(status=aw.STATUS_RESUME, peer_eid=A))
                assert resumed.WhichOneof("frame") == "ack"
                await b1.wait_for(lambda: b1.of("replay_complete"))
                assert [e.message.client_id for e in b1.entries(replay=True)] == ["from-a"]  # only A's
                bad = await b_aw.ask(
                    activity=aw.ActivityRequest(status=aw.STATUS_RESUME, peer_eid=A, after_offset=-1)
                )
                assert bad.error.reason == "INVALID_OFFSET"
                await b_aw.close()


async def test_activity_across_a_block_and_identity_from_the_token(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging", "awareness"]) as suite:
        async with suite.channel("awareness") as channel:
            await subscribe(suite, channel, B, A)  # B sees A: A may type to B
            a_aw = await open_stream(suite, channel, A, "a1")
            b_aw = await open_stream(suite, channel, B, "b1")
            typing = await a_aw.ask(activity=aw.ActivityRequest(status=aw.STATUS_TYPING, peer_eid=B))
            assert typing.WhichOneof("frame") == "ack"
            (activity,) = await eventually(
                lambda: [x for x in b_aw.of("activity") if x.status == aw.STATUS_TYPING]
            )
            # Who typed is the caller the token names: nothing in the frame can claim another user.
            assert (activity.by.eid, activity.by.device_id) == (A, "a1")
            stub = __import__("bimip.awareness.v1.awareness_pb2_grpc", fromlist=["x"]).AwarenessServiceStub(
                channel
            )
            await stub.Block(
                aw.BlockRequest(eid=A), metadata=(("authorization", f"Bearer {suite.token(B, 'b1')}"),)
            )
            refused = await a_aw.ask(activity=aw.ActivityRequest(status=aw.STATUS_TYPING, peer_eid=B))
            assert (refused.error.code, refused.error.reason) in {
                (grpc.StatusCode.PERMISSION_DENIED.value[0], "BLOCKED"),
            }
            await a_aw.close()
            await b_aw.close()

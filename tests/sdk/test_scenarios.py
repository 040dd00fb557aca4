"""SPEC public scenarios 3–6 driven through the SDK against real servers, on both backends; and
the SDK's sync: explicit sync, history from the local copy, resume and reset from a snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import grpc
import pytest

from bimip.core.clock import FakeClock
from bimip.sdk import (
    DELIVERED,
    DND,
    OFFLINE,
    ONLINE,
    PAUSED,
    TYPING,
    ActivityChanged,
    BimipClientError,
    Client,
    IntentChanged,
    MessageMirrored,
    PresenceChanged,
    SnapshotLoaded,
    SubscriptionChanged,
    VisibilityChanged,
)
from bimip.sdk.store import LocalStore
from tests.conftest import Backend
from tests.helpers import eventually
from tests.processes import free_ports
from tests.sdk.apps import App, apps
from tests.suite import running_suite

A, B, S, N = "alice@example.com", "bob@example.com", "sam@example.com", "nora@example.com"


def presences(app: App, eid: str) -> list[int]:
    return [e.status for e in app.of(PresenceChanged) if e.eid == eid]


async def test_scenario_3_an_offline_device_pulls_everything_in_order(
    backend: Backend, tmp_path: Path
) -> None:
    """A sends while B's only device is offline; B connects later and pulls everything after its
    last version, in order, then its cursor stands at the head."""
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        async with apps(suite, tmp_path, f"{A}/a1") as (a1,):
            for i in range(12):
                await a1.client.send(B, f"m{i}".encode(), client_id=f"m{i}")
        async with apps(suite, tmp_path, f"{B}/b1") as (b1,):
            head = (await b1.client.sync()).head
            await eventually(lambda: len(b1.received()) == 12)
            assert b1.received() == [f"m{i}" for i in range(12)]
            offsets = [e.offset for e in b1.events if hasattr(e, "offset")]
            assert offsets == sorted(offsets) and max(offsets) == head

            async def cursor_at_head() -> bool:
                devices = await b1.client.devices()
                return [(d.device_id, d.cursor) for d in devices.devices] == [("b1", head)]

            await eventually(cursor_at_head)
            assert all(count == 1 for count in b1.client.stats.by_offset.values()) or b1.client.stats.dropped


async def test_scenario_4_grace_redelivery_reaches_the_application_once(
    backend: Backend, tmp_path: Path
) -> None:
    """B1 receives but never acks: after the grace period the server sends the same entries again,
    which the SDK drops (the application saw them once); once B1 acks, nothing is redelivered."""
    clock = FakeClock()
    async with running_suite(
        backend, tmp_path, ["messaging", "sync"], clock=clock, BIMIP_GRACE_PERIOD_S="30"
    ) as suite:
        async with (
            apps(suite, tmp_path, f"{A}/a1") as (a1,),
            apps(suite, tmp_path, f"{B}/b1", auto_ack=False) as (b1,),
        ):
            await a1.client.send(B, b"one", client_id="m1")
            await a1.client.send(B, b"two", client_id="m2")
            await eventually(lambda: b1.received() == ["m1", "m2"])
            stats = b1.client.stats
            assert stats.by_offset == {1: 1, 2: 1}
            await clock.advance(31)
            await eventually(lambda: stats.by_offset == {1: 2, 2: 2})  # redelivered to the SDK
            assert b1.received() == ["m1", "m2"]  # not to the application
            b1.client.processed(2)

            async def acked() -> bool:
                return [d.cursor for d in (await b1.client.devices()).devices] == [2]

            await eventually(acked)
            await clock.advance(120)
            await a1.client.send(B, b"three", client_id="m3")  # something new still flows
            await eventually(lambda: b1.received() == ["m1", "m2", "m3"])
            assert stats.by_offset == {1: 2, 2: 2, 3: 1}


async def test_scenario_5_hello_uploads_the_outbox_and_a_second_hello_transfers_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    """A1 writes 3 messages offline while the server gets 5 from A2; A1's return uploads its 3 and
    receives the 5 (and the offsets of its own 3); a second hello transfers nothing."""
    dead_port = free_ports(1)[0]
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        offline = Client(
            suite.token(A, "a1"),
            messaging=f"127.0.0.1:{dead_port}",
            sync=f"127.0.0.1:{dead_port}",
            awareness=None,
            store=tmp_path / f"{A}-a1.db",
            backoff=(5, 5),
        )
        await offline.start()
        assert offline.state == "reconnecting"
        writes = []
        for i in range(3):  # one after the other, so the outbox keeps the order written
            writes.append(asyncio.create_task(offline.send(B, f"off-{i}".encode(), client_id=f"off-{i}")))
            await eventually(lambda i=i: _outbox_is(tmp_path / f"{A}-a1.db", i + 1))
        await offline.close()  # the device goes away with 3 messages in its outbox
        closed = await asyncio.gather(*writes, return_exceptions=True)
        assert [getattr(c, "reason", c) for c in closed] == ["CLIENT_CLOSED"] * 3

        async with apps(suite, tmp_path, f"{A}/a2") as (a2,):
            for i in range(5):
                await a2.client.send(B, f"on-{i}".encode(), client_id=f"on-{i}")
        async with apps(suite, tmp_path, f"{A}/a1") as (a1,):  # back online, same store
            await eventually(lambda: len(a1.of(MessageMirrored)) == 5)
            assert [e.message.client_id for e in a1.of(MessageMirrored)] == [f"on-{i}" for i in range(5)]
            assert await _outbox(tmp_path / f"{A}-a1.db") == []
            history = await eventually(lambda: _own(a1.client))
            assert [e.message.client_id for e in history] == ["off-0", "off-1", "off-2"]
            assert [e.offset for e in history] == [6, 7, 8]  # after A2's five, in the order written
            again = await a1.client.sync()  # the second hello
            assert (again.head, again.uploaded, again.received) == (8, 0, 0)


async def _outbox_is(path: Path, count: int) -> bool:
    return len(await _outbox(path)) == count


async def _outbox(path: Path) -> list[str]:
    store = LocalStore(path)
    try:
        return [p.client_id for p in await store.outbox()]
    finally:
        store.close()


async def _own(client: Client) -> list[object]:
    history = await client.history(B)
    own = [e for e in history if e.message.sender.device_id == "a1"]
    return own if len(own) == 3 else []


async def test_scenario_6_presence_and_typing_through_the_sdk(backend: Backend, tmp_path: Path) -> None:
    """A's subscriber S sees ONLINE, then DND, then OFFLINE with last seen; a non-subscriber sees
    nothing; TYPING reaches only the conversation peer and expires on its own."""
    clock = FakeClock()
    async with running_suite(backend, tmp_path, clock=clock) as suite:
        async with apps(suite, tmp_path, f"{S}/s1", f"{N}/n1") as (s1, n1):
            async with apps(suite, tmp_path, f"{A}/setup", awareness_stream=False) as (setup,):
                await s1.client.subscribe(A)
                await setup.client.approve(S)
                await setup.client.subscribe(S)
                await s1.client.approve(A)
            await eventually(lambda: presences(s1, A) == [OFFLINE])  # pushed with the approval
            assert any(e.subscription.state == 2 for e in s1.of(SubscriptionChanged))
            async with apps(suite, tmp_path, f"{A}/a1", f"{A}/a2") as (a1, a2):
                await eventually(lambda: presences(s1, A) == [OFFLINE, ONLINE])
                await a1.client.set_intent(DND)
                await eventually(lambda: presences(s1, A) == [OFFLINE, ONLINE, DND])
                await eventually(lambda: [e.intent for e in a2.of(IntentChanged)] == [DND])
                assert a2.client.intent == DND and s1.client.presences[A].status == DND

                await a1.client.typing(S)
                await eventually(lambda: [e.status for e in s1.of(ActivityChanged)] == [TYPING])
                typing = s1.of(ActivityChanged)[0]
                assert (typing.eid, typing.device_id) == (A, "a1") and typing.expires_at is not None
                await clock.advance(6.5)  # nobody is left typing: the stop comes by itself
                await eventually(lambda: [e.status for e in s1.of(ActivityChanged)] == [TYPING, PAUSED])
                assert not a2.of(ActivityChanged) and not n1.of(ActivityChanged)

                await a2.client.set_visibility(True)
                await eventually(lambda: [e.hidden for e in a1.of(VisibilityChanged)] == [True])
                await eventually(lambda: presences(s1, A)[-1] == OFFLINE)
                assert s1.client.presences[A].last_seen is None  # hidden: no last seen
                await a2.client.set_visibility(False)
                await eventually(lambda: presences(s1, A)[-1] == DND)
            await eventually(lambda: presences(s1, A)[-1] == OFFLINE)
            assert s1.client.presences[A].last_seen is not None
            assert presences(n1, A) == []  # a non-subscriber sees nothing
            with pytest.raises(BimipClientError) as refused:
                await n1.client.typing(A)
            assert (refused.value.code, refused.value.reason) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "NOT_SUBSCRIBED",
            )


async def test_history_holds_both_sides_and_resume_repairs_a_damaged_copy(
    backend: Backend, tmp_path: Path
) -> None:
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        async with apps(suite, tmp_path, f"{A}/a1", f"{B}/b1") as (a1, b1):
            for i in range(4):
                await a1.client.send(B, f"a{i}".encode(), client_id=f"a{i}")
            await eventually(lambda: len(b1.received()) == 4)
            reply = await b1.client.send(A, b"b0", client_id="b0")
            await eventually(lambda: len(a1.received()) == 1)
            assert reply.offset == 5

            async def a1_history_is_whole() -> bool:
                history = await a1.client.history(B)
                messages = [e.message.client_id for e in history if e.HasField("message")]
                return messages == ["a0", "a1", "a2", "a3", "b0"]

            await eventually(a1_history_is_whole)  # its own four, and the reply once processed
            # b1's log ends with the reply's DELIVERED receipt (a1's ack): until b1 has stored it, a
            # resume would find that range short of it.
            await eventually(lambda: b1.statuses("b0") == [DELIVERED])

            def b1_stored_up_to() -> int:
                with contextlib.closing(sqlite3.connect(tmp_path / f"{B}-b1.db")) as db:
                    return int(db.execute('SELECT max("offset") FROM log').fetchone()[0] or 0)

            await eventually(lambda: b1_stored_up_to() == 6)
            # The local copy is the server's, byte for byte: nothing to repair.
            assert await b1.client.resume_from_snapshot() == 0
            db = sqlite3.connect(tmp_path / f"{B}-b1.db")
            db.execute('DELETE FROM log WHERE "offset" = 2')
            db.execute("UPDATE log SET entry = x'00' WHERE \"offset\" = 3")
            db.commit()
            db.close()
            assert await b1.client.resume_from_snapshot() == 1  # range 0, repaired
            assert await b1.client.resume_from_snapshot() == 0
            restored = [e.message.client_id for e in await b1.client.history(A) if e.HasField("message")]
            assert restored[:4] == ["a0", "a1", "a2", "a3"]


async def test_a_position_beyond_the_servers_log_starts_again_from_a_snapshot(
    backend: Backend, tmp_path: Path
) -> None:
    """After the server's log was restored to an earlier point, the device's stored position lies
    beyond its head: the SDK takes a snapshot, says so, and goes on from there."""
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        async with apps(suite, tmp_path, f"{A}/a1") as (a1,):
            await a1.client.send(B, b"one", client_id="m1")
            await a1.client.send(B, b"two", client_id="m2")
        store = LocalStore(tmp_path / f"{B}-b1.db")
        await store.set_processed(50)
        store.close()
        async with apps(suite, tmp_path, f"{B}/b1") as (b1,):
            loaded = await eventually(lambda: b1.of(SnapshotLoaded))
            snapshot = loaded[0].snapshot
            assert snapshot.version == 2 and b1.client.position == 2
            assert [c.peer_eid for c in snapshot.conversations] == [A]
            assert snapshot.conversations[0].last_entry.message.client_id == "m2"
            assert snapshot.conversations[0].unread_count == 2
            async with apps(suite, tmp_path, f"{A}/a1") as (a1,):
                await a1.client.send(B, b"three", client_id="m3")
            await eventually(lambda: b1.received() == ["m3"])

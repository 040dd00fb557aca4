"""SPEC S3, S4, S6: snapshots (the same for every device at a version), checkpoints, and resume by
range checksums repairing exactly what differs."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from bimip.common.v1 import common_pb2
from bimip.core.errors import reason_of
from bimip.core.ranges import RangeHasher
from bimip.core.storage import create_engine
from bimip.sync.v1 import sync_pb2
from services.sync import store
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import devices, message
from tests.suite import running_suite
from tests.sync.client import SyncDevice, offline

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
SERVICES = ["messaging", "sync"]
READ, DELIVERED = common_pb2.DELIVERY_STATUS_READ, common_pb2.DELIVERY_STATUS_DELIVERED
EDIT, DELETE_ALL = common_pb2.COMMAND_KIND_EDIT, common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE


async def test_snapshot_summarises_each_conversation_the_same_on_every_device(
    backend: Backend, tmp_path: Path
) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1", f"{B}/b1", f"{C}/c1") as (a1, b1, c1):
            acks = [await a1.sent(message(B, f"m{i}", f"v{i}".encode())) for i in range(5)]
            await b1.wait_entries(5)
            await b1.ack(b1.offsets()[-1])  # DELIVERED: receipts in A's log
            assert (await b1.mark(READ, signal_id=acks[1].signal_id)).WhichOneof("frame") != "error"
            clock = common_pb2.HybridLogicalClock
            await a1.command(
                signal_id=acks[4].signal_id, kind=EDIT, clock=clock(wall_time_ms=1), payload=b"e4"
            )
            await a1.command(signal_id=acks[3].signal_id, kind=DELETE_ALL, clock=clock(wall_time_ms=2))
            await c1.sent(message(B, "c0"))
        b_phone, b_laptop = SyncDevice(suite, channel, B, "phone"), SyncDevice(suite, channel, B, "laptop")
        snapshot = await b_phone.snapshot()
        by_peer = {c.peer_eid: c for c in snapshot.conversations}
        assert sorted(by_peer) == [A, C]
        with_a = by_peer[A]
        assert (with_a.last_entry.message.client_id, with_a.last_entry.message.payload) == ("m4", b"e4")
        assert with_a.unread_count == 2  # m2 and m4: m1 was read (and m0 with it), m3 deleted
        assert with_a.last_status == DELIVERED
        assert (by_peer[C].last_entry.message.client_id, by_peer[C].unread_count) == ("c0", 1)
        # Another device at the same version sees the same snapshot.
        same = await b_laptop.snapshot(snapshot.version)
        assert (same.snapshot_id, same.checksum, same.conversations) == (
            snapshot.snapshot_id,
            snapshot.checksum,
            snapshot.conversations,
        )
        # A's side: its sent message's status, nothing unread.
        a_side = await SyncDevice(suite, channel, A, "a1").snapshot()
        (with_b,) = a_side.conversations
        assert (with_b.peer_eid, with_b.unread_count, with_b.last_entry.message.payload) == (B, 0, b"e4")
        assert with_b.last_status == DELIVERED
        # An earlier version is a different snapshot; the devices list their last one.
        earlier = await b_phone.snapshot(3)
        assert earlier.version == 3 and earlier.snapshot_id != snapshot.snapshot_id
        listed = {d.device_id: d for d in (await b_phone.devices()).devices}
        assert listed["phone"].last_snapshot_id == earlier.snapshot_id
        assert (listed["laptop"].last_snapshot_id, listed["laptop"].last_snapshot_version) == (
            snapshot.snapshot_id,
            snapshot.version,
        )


async def test_snapshot_refusals(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1") as (a1,):
            await a1.sent(message(B, "one"))
        b1 = SyncDevice(suite, channel, B, "b1")
        for call, code, reason in [
            (b1.snapshot(-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
            (b1.snapshot(2), grpc.StatusCode.OUT_OF_RANGE, "VERSION_BEYOND_HEAD"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert (info.value.code(), reason_of(info.value)) == (code, reason)


async def _fill(suite: object, channel: object, count: int) -> None:
    """`count` messages from A to B, uploaded through hellos (1,000 at a time)."""
    a1 = SyncDevice(suite, channel, A, "a1")  # type: ignore[arg-type]
    for start in range(0, count, 1000):
        hello = await a1.hello()
        n = min(1000, count - start)
        await hello.open(0, *(offline(B, f"m{start + i}", f"{start + i:08d}:0:a1") for i in range(n)))
        await hello.until_end()
        assert [x.error.reason for x in hello.of("appended") if x.error.reason] == []
        await hello.close()


# Offline uploads count against the sender's send rate (X3) like any send.
UNLIMITED = {"BIMIP_SEND_RATE": "100000", "BIMIP_SEND_BURST": "100000"}


async def test_resume_repairs_exactly_the_damaged_and_missing_ranges(
    backend: Backend, tmp_path: Path
) -> None:
    async with (
        running_suite(backend, tmp_path, SERVICES, **UNLIMITED) as suite,
        suite.channel("sync") as channel,
    ):
        await _fill(suite, channel, 2500)  # B's log: ranges 0 and 1 full, range 2 partial
        b1 = SyncDevice(suite, channel, B, "b1")
        local = await b1.everything()
        assert len(local) == 2500
        snapshot = await b1.snapshot()
        ours = RangeHasher(snapshot.version).add_all(local).digests()
        assert {r.range_index: r.sha256 for r in snapshot.ranges} == ours
        # The two full ranges are kept; the next snapshot hashes only the partial one, alike.
        engine = create_engine(backend.database_url)
        try:
            async with engine.connect() as conn:
                query = select(store.ranges.c.range_index).where(store.ranges.c.eid == B)
                assert sorted(k for (k,) in await conn.execute(query)) == [0, 1]
        finally:
            await engine.dispose()
        again = await b1.snapshot()
        assert {r.range_index: r.sha256 for r in again.ranges} == ours

        def ranges(digests: dict[int, bytes]) -> list[sync_pb2.RangeChecksum]:
            return [sync_pb2.RangeChecksum(range_index=k, sha256=d) for k, d in digests.items()]

        intact = await b1.resume(snapshot_id=snapshot.snapshot_id, ranges=ranges(ours))
        assert (intact.version, list(intact.repairs)) == (2500, [])
        # Damage range 1 (one payload changed) and lose range 2 entirely.
        damaged = list(local)
        damaged[1500].message.payload = b"corrupted"
        digests = RangeHasher(snapshot.version).add_all(damaged).digests()
        del digests[2]
        answer = await b1.resume(version=2500, ranges=ranges(digests))
        assert [r.range_index for r in answer.repairs] == [1, 2]
        repaired = {e.offset: e for r in answer.repairs for e in r.entries}
        assert sorted(repaired) == list(range(1025, 2501))
        fixed = [repaired.get(e.offset, e) for e in damaged]
        assert RangeHasher(2500).add_all(fixed).digests() == ours
        assert [r.sha256 for r in answer.repairs] == [ours[1], ours[2]]


async def test_resume_refusals(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1") as (a1,):
            await a1.sent(message(B, "one"))
        b1, a_dev = SyncDevice(suite, channel, B, "b1"), SyncDevice(suite, channel, A, "a1")
        theirs = await a_dev.snapshot()
        good = bytes(32)
        checksum = sync_pb2.RangeChecksum
        cases = [
            ({"snapshot_id": theirs.snapshot_id}, grpc.StatusCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND"),
            ({"snapshot_id": "f" * 32}, grpc.StatusCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND"),
            ({"version": 5}, grpc.StatusCode.FAILED_PRECONDITION, "SNAPSHOT_REQUIRED"),
            ({"version": -1}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
            ({}, grpc.StatusCode.INVALID_ARGUMENT, "BASE_REQUIRED"),
            (
                {"version": 1, "algorithm": sync_pb2.CHECKSUM_ALGORITHM_UNSPECIFIED},
                grpc.StatusCode.INVALID_ARGUMENT,
                "UNSUPPORTED_ALGORITHM",
            ),
            (
                {"version": 1, "ranges": [checksum(range_index=0, sha256=b"short")]},
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_CHECKSUM",
            ),
            (
                {"version": 1, "ranges": [checksum(range_index=0, sha256=good)] * 2},
                grpc.StatusCode.INVALID_ARGUMENT,
                "DUPLICATE_RANGE",
            ),
            (
                {"version": 1, "ranges": [checksum(range_index=1, sha256=good)]},
                grpc.StatusCode.INVALID_ARGUMENT,
                "RANGE_OUT_OF_BOUNDS",
            ),
        ]
        for request, code, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await b1.resume(**request)
            assert (info.value.code(), reason_of(info.value)) == (code, reason), request


async def test_checkpoints_follow_the_head(backend: Backend, tmp_path: Path) -> None:
    env = {"BIMIP_CHECKPOINT_EVERY_ENTRIES": "3"}
    async with running_suite(backend, tmp_path, SERVICES, **env) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1") as (a1,):
            for i in range(4):
                await a1.sent(message(B, f"m{i}"))
        b1 = SyncDevice(suite, channel, B, "b1")
        engine = create_engine(backend.database_url)
        try:

            async def versions() -> list[int]:
                async with engine.connect() as conn:
                    query = select(store.snapshots.c.version).where(store.snapshots.c.eid == B)
                    return sorted(v for (v,) in await conn.execute(query))

            async def checkpoints_are(expected: list[int]) -> bool:
                return await versions() == expected

            assert await versions() == []
            await b1.delta(0)  # 4 entries past no checkpoint: one is taken at the head
            await eventually(lambda: checkpoints_are([4]))
            async with devices(suite, f"{A}/a1") as (a1,):
                await a1.sent(message(B, "m4"))
            await b1.delta(4)  # only 1 past the last: none
            assert await versions() == [4]
            async with devices(suite, f"{A}/a1") as (a1,):
                for i in range(5, 7):
                    await a1.sent(message(B, f"m{i}"))
            await b1.delta(4)
            await eventually(lambda: checkpoints_are([4, 7]))
            # A snapshot continues from the checkpoint and matches one folded from the start.
            snapshot = await b1.snapshot()
            assert snapshot.version == 7 and snapshot.conversations[0].unread_count == 7
        finally:
            await engine.dispose()

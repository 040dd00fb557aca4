"""What the sync service does (SPEC S1–S7), through messaging's LogLink, never messaging's tables.

- Delta (S2): pages of a LogLink read as the device sees it (S1), one page or all of them under
  flow control.
- Snapshot (S3): the user's log folded (`Fold`) from the latest checkpoint at or below the version;
  every snapshot is stored with its fold state and so becomes a checkpoint. After a delta or a
  hello, a checkpoint is taken in the background once the head is `BIMIP_CHECKPOINT_EVERY_ENTRIES`
  past the last one, or the last is `BIMIP_CHECKPOINT_EVERY_S` old and the head moved.
- Resume (S4): the device's range checksums up to the version against the client's; the ranges
  that differ or are missing are sent whole.
- Devices (S6): messaging's cursors and last-seen times, with each device's last snapshot.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import timedelta
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bimip.common.v1 import common_pb2
from bimip.core.clock import Clock, timestamp
from bimip.core.errors import BimipError, invalid
from bimip.core.metrics import Metrics
from bimip.core.ranges import RANGE_SIZE, RangeHasher, range_of, ranges_upto
from bimip.core.storage import dialect_insert
from bimip.core.streams import RunToEnd
from bimip.messaging.v1 import internal_pb2
from bimip.sync.v1 import sync_pb2
from services.links import LogLink
from services.sync import store
from services.sync.config import SyncSettings
from services.sync.snapshots import Fold

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
FOLD_PAGE_SIZE = 1000
SHA256 = sync_pb2.CHECKSUM_ALGORITHM_SHA256_RANGE_1024


def check_version(version: int, name: str = "since_version") -> None:
    if version < 0:
        raise invalid("INVALID_VERSION", f"{name} must not be negative", field=name)


def snapshot_not_found() -> BimipError:
    # The same answer for an unknown id and for another user's: ids reveal nothing.
    return BimipError(grpc.StatusCode.NOT_FOUND, "SNAPSHOT_NOT_FOUND", "no such snapshot for this user")


def _delta(page: internal_pb2.LogPage) -> sync_pb2.GetDeltaResponse:
    """A LogLink page as a delta page (S2): entries, next version, more, head."""
    return sync_pb2.GetDeltaResponse(
        entries=page.entries, next_version=page.next_after, more=page.more, head=page.head
    )


class SyncCore:
    def __init__(
        self,
        settings: SyncSettings,
        clock: Clock,
        engine: AsyncEngine,
        writer: AsyncEngine,
        link: LogLink,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.engine = engine
        self.writer = writer
        self.link = link
        self.background = RunToEnd()
        self._checkpointing: set[str] = set()

    # --- delta (S2) ---

    def page_size(self, requested: int) -> int:
        if requested == 0:
            return self.settings.delta_page_size
        if not 1 <= requested <= MAX_PAGE_SIZE:
            raise invalid(
                "INVALID_PAGE_SIZE", f"page_size is 1..{MAX_PAGE_SIZE} (0 = the default)", field="page_size"
            )
        return requested

    async def pages(
        self, eid: str, device_id: str, since: int, page_size: int, *, window: int = 2
    ) -> AsyncGenerator[sync_pb2.GetDeltaResponse, None]:
        """Every page after `since` up to the head at the time of the call, as the device sees it."""
        check_version(since)
        head = 0
        async with aclosing(
            self.link.read(eid, device_id, since, page_size=page_size, window=window)
        ) as reads:
            async for page in reads:
                head = page.head
                yield _delta(page)
        self.after_sync(eid, head)

    async def delta(self, eid: str, device_id: str, since: int, page_size: int) -> sync_pb2.GetDeltaResponse:
        check_version(since)
        reads = self.link.read(eid, device_id, since, page_size=self.page_size(page_size), window=1)
        async with aclosing(reads):
            async for page in reads:
                self.after_sync(eid, page.head)
                return _delta(page)
        raise AssertionError("a read answers at least one page")

    async def _entries(
        self, eid: str, device_id: str, after: int, upto: int
    ) -> AsyncGenerator[common_pb2.Entry, None]:
        """The entries in (after, upto] as the device sees them (every entry if `device_id` is
        empty), read in large pages; the read ends at `upto`."""
        if after >= upto:
            return
        reads = self.link.read(eid, device_id, after, page_size=FOLD_PAGE_SIZE)
        async with aclosing(reads):
            async for page in reads:
                for entry in page.entries:
                    if entry.offset > upto:
                        return
                    yield entry
                if page.next_after >= upto:
                    return

    # --- snapshots (S3) ---

    async def head(self, eid: str) -> int:
        return (await self.link.devices(eid)).head

    async def _latest_row(self, eid: str, upto: int | None, *, state: bool = True) -> Any:
        """The user's latest stored snapshot at or below `upto`; without its (large) fold state
        unless `state`."""
        t = store.snapshots
        columns = list(t.c) if state else [t.c.snapshot_id, t.c.version, t.c.created_at]
        query = select(*columns).where(t.c.eid == eid)
        if upto is not None:
            query = query.where(store.snapshots.c.version <= upto)
        async with self.engine.connect() as conn:
            result = await conn.execute(query.order_by(t.c.version.desc()).limit(1))
            return result.first()

    async def fold_at(self, eid: str, version: int) -> tuple[Fold, Any]:
        """The fold at `version` and its stored row if one exists at exactly that version."""
        row = await self._latest_row(eid, version)
        if row is not None and row.version == version:
            return Fold.load(row.state), row
        fold = Fold.load(row.state) if row is not None else Fold(eid)
        async with aclosing(self._entries(eid, "", fold.version, version)) as entries:
            async for entry in entries:
                fold.apply(entry)
        fold.version = version
        return fold, None

    async def store_snapshot(self, fold: Fold) -> Any:
        """Store the fold as the user's snapshot at its version (or find the one already there)."""
        insert = dialect_insert(self.writer, store.snapshots).values(
            snapshot_id=uuid.uuid4().hex,
            eid=fold.eid,
            version=fold.version,
            created_at=self.clock.now(),
            checksum=fold.checksum(),
            state=fold.dump(),
        )
        async with self.writer.begin() as conn:
            await conn.execute(insert.on_conflict_do_nothing(index_elements=["eid", "version"]))
        row = await self._latest_row(fold.eid, fold.version)
        assert row is not None and row.version == fold.version
        return row

    async def snapshot(self, eid: str, device_id: str, version: int) -> sync_pb2.Snapshot:
        check_version(version, "version")
        head = await self.head(eid)
        if version > head:
            raise BimipError(
                grpc.StatusCode.OUT_OF_RANGE,
                "VERSION_BEYOND_HEAD",
                "the version is beyond the head of the log",
                {"head": str(head)},
            )
        version = version or head
        fold, row = await self.fold_at(eid, version)
        if row is None:
            row = await self.store_snapshot(fold)
        ranges = await self.range_digests(eid, device_id, version)
        await self._record_device_snapshot(eid, device_id, row)
        snapshot = sync_pb2.Snapshot(
            snapshot_id=row.snapshot_id,
            eid=eid,
            version=version,
            conversations=fold.summaries(),
            checksum=row.checksum,
            created_at=timestamp(row.created_at),
            algorithm=SHA256,
        )
        snapshot.ranges.extend(sync_pb2.RangeChecksum(range_index=k, sha256=d) for k, d in ranges.items())
        return snapshot

    async def _record_device_snapshot(self, eid: str, device_id: str, row: Any) -> None:
        values = {"snapshot_id": row.snapshot_id, "version": row.version, "at": self.clock.now()}
        insert = dialect_insert(self.writer, store.device_snapshots).values(
            eid=eid, device_id=device_id, **values
        )
        async with self.writer.begin() as conn:
            await conn.execute(insert.on_conflict_do_update(index_elements=["eid", "device_id"], set_=values))

    def after_sync(self, eid: str, head: int) -> None:
        """Take a checkpoint in the background if the user's last one is far enough behind."""
        if eid in self._checkpointing or head == 0:
            return
        self._checkpointing.add(eid)

        async def checkpoint() -> None:
            try:
                row = await self._latest_row(eid, None, state=False)
                due = head - (row.version if row is not None else 0) >= self.settings.checkpoint_every_entries
                if row is not None and head > row.version:
                    age = self.clock.now() - row.created_at
                    due = due or age >= timedelta(seconds=self.settings.checkpoint_every_s)
                if due:
                    fold, existing = await self.fold_at(eid, head)
                    if existing is None:
                        await self.store_snapshot(fold)
            except (BimipError, OSError) as exc:
                log.warning("sync: checkpoint of %s at %d failed: %s", eid, head, exc)
            finally:
                self._checkpointing.discard(eid)

        self.background.start(checkpoint())

    # --- resume (S4) ---

    async def range_digests(self, eid: str, device_id: str, version: int) -> dict[int, bytes]:
        """The device's digest of every range up to `version`. Full ranges are hashed once and
        kept (`sync_ranges`); only the ranges after the kept ones are read and hashed."""
        full = version // RANGE_SIZE  # ranges 0..full-1 lie wholly at or below the version
        r = store.ranges
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(r.c.range_index, r.c.sha256).where(
                    r.c.eid == eid, r.c.device_id == device_id, r.c.range_index < full
                )
            )
            kept = {int(k): bytes(digest) for k, digest in rows}
        start = next((k for k in range(full) if k not in kept), full)
        digests = {k: kept[k] for k in range(start)}
        if start < ranges_upto(version):
            hasher = RangeHasher(version)
            async with aclosing(self._entries(eid, device_id, start * RANGE_SIZE, version)) as entries:
                async for entry in entries:
                    hasher.add(entry)
            hashed = hasher.digests()
            digests |= {k: hashed[k] for k in range(start, ranges_upto(version))}
            if start < full:
                new_rows = [
                    {"eid": eid, "device_id": device_id, "range_index": k, "sha256": hashed[k]}
                    for k in range(start, full)
                ]
                insert = dialect_insert(self.writer, r).values(new_rows).on_conflict_do_nothing()
                async with self.writer.begin() as conn:
                    await conn.execute(insert)
        return digests

    async def _resume_version(self, eid: str, request: sync_pb2.ResumeSnapshotRequest) -> tuple[int, Any]:
        if request.WhichOneof("base") == "snapshot_id":
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(
                        select(store.snapshots).where(store.snapshots.c.snapshot_id == request.snapshot_id)
                    )
                ).first()
            if row is None or row.eid != eid:
                raise snapshot_not_found()
            return row.version, row
        check_version(request.version, "version")
        head = await self.head(eid)
        if request.version > head:
            raise BimipError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "SNAPSHOT_REQUIRED",
                "the version is beyond the head; take a snapshot",
                {"head": str(head)},
            )
        return request.version, None

    async def resume(
        self, eid: str, device_id: str, request: sync_pb2.ResumeSnapshotRequest
    ) -> sync_pb2.ResumeSnapshotResponse:
        if request.algorithm != SHA256:
            raise invalid(
                "UNSUPPORTED_ALGORITHM",
                "algorithm must be CHECKSUM_ALGORITHM_SHA256_RANGE_1024",
                field="algorithm",
            )
        if request.WhichOneof("base") is None:
            raise invalid("BASE_REQUIRED", "give a snapshot_id or a version", field="base")
        version, row = await self._resume_version(eid, request)
        count = ranges_upto(version)
        theirs: dict[int, bytes] = {}
        for r in request.ranges:
            if len(r.sha256) != 32:
                raise invalid(
                    "INVALID_CHECKSUM", f"range {r.range_index}: a SHA-256 is 32 bytes", field="ranges"
                )
            if not 0 <= r.range_index < count:
                raise invalid(
                    "RANGE_OUT_OF_BOUNDS",
                    f"range {r.range_index} is outside 0..{count - 1} for version {version}",
                    field="ranges",
                )
            if r.range_index in theirs:
                raise invalid("DUPLICATE_RANGE", f"range {r.range_index} is given twice", field="ranges")
            theirs[r.range_index] = r.sha256
        ours = await self.range_digests(eid, device_id, version)
        differing = sorted(k for k, digest in ours.items() if theirs.get(k) != digest)
        response = sync_pb2.ResumeSnapshotResponse(version=version)
        if differing:
            repairs = {k: sync_pb2.RangeRepair(range_index=k, sha256=ours[k]) for k in differing}
            after = differing[0] * RANGE_SIZE
            async with aclosing(self._entries(eid, device_id, after, version)) as entries:
                async for entry in entries:
                    if (repair := repairs.get(range_of(entry.offset))) is not None:
                        repair.entries.append(entry)
            response.repairs.extend(repairs[k] for k in differing)
        if row is not None:
            await self._record_device_snapshot(eid, device_id, row)
        return response

    # --- hello (S5) ---

    async def append(self, eid: str, device_id: str, messages: list[common_pb2.Message]) -> list[Any]:
        results: list[Any] = []
        for start in range(0, len(messages), 1000):
            answer = await self.link.append(eid, device_id, messages[start : start + 1000])
            results.extend(answer.results)
        return results

    async def ack(self, eid: str, device_id: str, offset: int) -> int:
        check_version(offset, "offset")
        return await self.link.ack(eid, device_id, offset)

    # --- devices (S6) ---

    async def devices(self, eid: str) -> sync_pb2.ListDevicesResponse:
        cursors = await self.link.devices(eid)
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(store.device_snapshots).where(store.device_snapshots.c.eid == eid))
            ).all()
        last = {row.device_id: row for row in rows}
        states: dict[str, sync_pb2.DeviceSyncState] = {}
        for device in cursors.devices:
            state = states[device.device_id] = sync_pb2.DeviceSyncState(
                device_id=device.device_id, cursor=device.cursor
            )
            state.last_seen.CopyFrom(device.last_seen)
        for device_id, row in last.items():
            # A device that only took snapshots is known to sync alone: cursor 0, seen then.
            if device_id not in states:
                states[device_id] = sync_pb2.DeviceSyncState(device_id=device_id)
                states[device_id].last_seen.CopyFrom(timestamp(row.at))
            state = states[device_id]
            state.last_snapshot_id = row.snapshot_id
            state.last_snapshot_version = row.version
            state.last_snapshot_at.CopyFrom(timestamp(row.at))
        return sync_pb2.ListDevicesResponse(
            head=cursors.head, devices=[states[device_id] for device_id in sorted(states)]
        )

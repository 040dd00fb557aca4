"""Delivery to device streams (SPEC M4–M7, M11, M12, X5, X8).

A `DeviceStream` is one device's open Connect stream on this replica. Its pump reads the user's
log from storage after the device's position, skips what the device must not get back (its own
entries, entries for another device) and sends the rest, with at most `window` unacknowledged
entries in flight. It wakes when the log grows (a notice from this replica's writer or, through the
bus, another replica's), on an ack, on a heartbeat tick and when the grace timer fires. Because it
always reads storage, a missed notice or a slow device costs lag, never an entry (M12): nothing is
queued per device beyond one window.

The `Hub` is the replica's registry of open streams and its one bus subscription: the log channels
of users with a stream here and the device channels of those devices. A device channel carries
"a new stream opened" (the older stream ends with CONNECTED_ELSEWHERE, M7), "flush" (ONLINE, M11),
"replay" (RESUME, M11) and "cursor" (a cursor moved elsewhere, e.g. by sync).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from opentelemetry.trace import SpanKind, Tracer
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bimip.core.aio import Flag, Mailbox
from bimip.core.clock import Clock
from bimip.core.errors import BimipError
from bimip.core.metrics import Metrics
from bimip.core.pubsub import Bus, Subscription, consumer_span
from bimip.core.streams import RunToEnd
from bimip.messaging.v1 import messaging_pb2
from services.messaging import store
from services.messaging.ops import context_of, device_channel, log_channel, traceparent_of
from services.messaging.writer import Append, chunks

log = logging.getLogger(__name__)

PAGE = 256
TAIL = 1024  # recent entries kept per user with a stream here

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Row:
    offset: int
    kind: int
    author_eid: str
    author_device: str
    target_device: str | None
    signal_id: str
    trace_context: str | None
    body: bytes

    @classmethod
    def of(cls, append: Append) -> Row:
        author = append.entry.author
        return cls(
            append.offset,
            append.kind,
            author.eid,
            author.device_id,
            append.target_device,
            append.signal_id,
            append.trace_context,
            append.body,
        )

    def visible_to(self, eid: str, device_id: str) -> bool:
        """M4: not the device's own entry, and not an entry for another device."""
        if self.author_eid == eid and self.author_device == device_id:
            return False
        return self.target_device is None or self.target_device == device_id


_COLUMNS = (
    store.entries.c.offset,
    store.entries.c.kind,
    store.entries.c.author_eid,
    store.entries.c.author_device,
    store.entries.c.target_device,
    store.entries.c.signal_id,
    store.entries.c.trace_context,
    store.entries.c.body,
)


async def read_log(
    engine: AsyncEngine,
    eid: str,
    after: int,
    limit: int,
    *,
    peer_eid: str | None = None,
    upto: int | None = None,
) -> list[Row]:
    """Entries of `eid`'s log after `after`, in offset order (on the primary key: cost ∝ the page)."""
    async with engine.connect() as conn:
        result = await conn.execute(read_log_query(eid, after, limit, peer_eid=peer_eid, upto=upto))
        return [Row(*r) for r in result]


def read_log_query(
    eid: str, after: int, limit: int, *, peer_eid: str | None = None, upto: int | None = None
) -> Select[Any]:
    """The one query every log read runs: a range of the primary key (eid, offset).

    Offsets are gap-free (M2), so without a peer filter the page is exactly (after, after + limit]:
    bounding the range there gives the planner a page-sized estimate, however long the rest of the
    log is (tests/sync/test_delta_cost.py checks the plan)."""
    e = store.entries
    query = select(*_COLUMNS).where(e.c.eid == eid, e.c.offset > after)
    if peer_eid is not None:
        query = query.where(e.c.peer_eid == peer_eid)
    else:
        upto = after + limit if upto is None else min(upto, after + limit)
    if upto is not None:
        query = query.where(e.c.offset <= upto)
    return query.order_by(e.c.offset).limit(limit)


MAX_BATCH = 64
"""The most entries one `deliveries` frame carries, whatever a device asks for (OpenRequest.max_batch)."""
BATCH_BYTES = 1 << 20
"""A batch also stops before an entry that would take it past this many bytes (an entry alone may
be larger; it then goes in a frame of its own)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited_tag(number: int) -> bytes:
    return _varint(number << 3 | 2)


_DELIVERIES_TAG = _length_delimited_tag(messaging_pb2.ConnectResponse.DELIVERIES_FIELD_NUMBER)
_ITEM_TAG = _length_delimited_tag(messaging_pb2.DeliveryBatch.DELIVERIES_FIELD_NUMBER)


def _is_delivery(item: Any) -> bool:
    return isinstance(item, messaging_pb2.ConnectResponse) and item.WhichOneof("frame") == "delivery"


def _batched_delivery(frame: messaging_pb2.ConnectResponse) -> bytes:
    """The frame's Delivery, serialized, with the frame's traceparent moved into it."""
    delivery = frame.delivery
    if traceparent := frame.trace_context.get("traceparent"):
        delivery.trace_context["traceparent"] = traceparent
    return delivery.SerializeToString()


def take_batch(
    first: messaging_pb2.ConnectResponse, out: Mailbox[Any], limit: int
) -> messaging_pb2.ConnectResponse | bytes:
    """`first` with the delivery frames queued right behind it in `out` (taken from it), up to
    `limit` entries and BATCH_BYTES: one `deliveries` frame, serialized here, each entry's trace
    context moved into its Delivery. `first` as it is when it is not a delivery or no delivery is
    queued behind it. Frames of other kinds end a batch, so every frame keeps its place."""
    if limit < 2 or out.empty() or not _is_delivery(out.peek_nowait()) or not _is_delivery(first):
        return first
    parts: list[bytes] = []
    size = 0
    body = _batched_delivery(first)
    while True:
        part = _ITEM_TAG + _varint(len(body)) + body
        parts.append(part)
        size += len(part)
        if len(parts) >= limit or out.empty():
            break
        following = out.peek_nowait()
        if not _is_delivery(following):
            break
        body = _batched_delivery(following)
        if size + len(body) + 8 > BATCH_BYTES:
            break  # it stays first in line (a lone frame then carries its traceparent twice)
        out.get_nowait()
    packed = b"".join(parts)
    return _DELIVERIES_TAG + _varint(len(packed)) + packed


@dataclass(frozen=True)
class Closed:
    """The stream ends: normally (error None: the client half-closed) or with an error."""

    error: BimipError | None = None


class DeviceStream:
    """One device's Connect stream on this replica."""

    _ids = itertools.count(1)

    def __init__(
        self,
        hub: Hub,
        eid: str,
        device_id: str,
        cursor: int,
        *,
        window: int,
        grace: float,
        clock: Clock,
        tracer: Tracer,
        queue_size: int,
        spans: bool = True,
    ) -> None:
        self.hub = hub
        self.eid = eid
        self.device_id = device_id
        self.sid = f"{hub.replica}/{next(self._ids)}"
        self.opened = (time.time_ns(), self.sid)
        self.cursor = cursor
        self.scanned = cursor  # everything up to here was sent or passed over in this pass
        self.inflight: list[int] = []  # sent and unacknowledged, ascending (a list is smaller than a deque)
        self.traces: dict[int, str | None] = {}  # sent and unacknowledged: offset -> traceparent
        self.received: dict[int, str] = {}  # of those, messages from other users: offset -> signal_id
        self.window = window
        self.grace = grace
        self.clock = clock
        self.tracer = tracer
        self.spans = spans  # False: nothing records spans; deliveries pass the entry's context on
        self.out: Mailbox[messaging_pb2.ConnectResponse | Closed] = Mailbox(queue_size)
        self.redeliver_upto = 0
        self._reached = cursor
        self._wake = Flag()
        self._grace_expired = False
        self._grace_task: asyncio.Task[None] | None = None
        self._replays: list[tuple[str, int]] = []
        self._pump_task: asyncio.Task[None] | None = None
        self._closed = False
        self.pending_cursor: int | None = None  # a cursor move requested and not yet committed

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._pump_task = asyncio.create_task(self._pump(), name=f"deliver-{self.eid}/{self.device_id}")
        self.wake()

    def cancel(self) -> list[asyncio.Task[None]]:
        """Stop the stream's tasks now (no await, so a cancelled caller cannot leave them running);
        returns them to be awaited."""
        self._closed = True
        tasks = [t for t in (self._pump_task, self._grace_task) if t is not None]
        for task in tasks:
            task.cancel()
        return tasks

    def end(self, error: BimipError | None) -> None:
        """End the stream with `error` (replaced, shutting down), or normally with None."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self.out.full():
            # Make room for the end: what is dropped is a delivery (sent again to the next stream,
            # from the cursor) or an answer the client gets again by retrying (sends are idempotent).
            self.out.get_nowait()
        self.out.put_nowait(Closed(error))

    @property
    def closed(self) -> bool:
        return self._closed

    def wake(self) -> None:
        self._wake.set()

    # --- events --------------------------------------------------------------------------------

    def notify(self, head: int) -> None:
        if head > self.scanned:
            self._wake.set()

    def on_device_event(self, event: dict[str, Any]) -> None:
        kind = event.get("t")
        if kind == "open":
            other = (int(event.get("at", 0)), str(event.get("sid", "")))
            if other > self.opened:
                self.end(
                    BimipError(
                        grpc.StatusCode.ABORTED,
                        "CONNECTED_ELSEWHERE",
                        "a newer stream for this device replaced this one",
                    )
                )
        elif kind == "flush":
            self.flush()
        elif kind == "replay":
            self.replay(str(event.get("peer", "")), int(event.get("after", 0)))
        elif kind == "cursor":
            self.cursor_moved(int(event.get("cursor", 0)))

    def flush(self) -> None:
        """M11: push pending entries now: unacknowledged ones again, then anything new."""
        if self.inflight:
            self._grace_expired = True
        self._wake.set()

    def replay(self, peer_eid: str, after: int) -> None:
        self._replays.append((peer_eid, after))
        self._wake.set()

    def cursor_moved(self, cursor: int) -> None:
        """The durable cursor is now `cursor`: forget what it covers."""
        if cursor <= self.cursor:
            return
        self.cursor = cursor
        while self.inflight and self.inflight[0] <= cursor:
            self.inflight.pop(0)
        for offset in [o for o in self.traces if o <= cursor]:
            del self.traces[offset]
            self.received.pop(offset, None)
        if self.scanned < cursor:
            self.scanned = cursor
        if self.inflight:
            self._restart_grace()
        else:
            self._stop_grace()
        self._wake.set()

    # --- acks ----------------------------------------------------------------------------------

    def acked_position(self, offset: int) -> int:
        """Where the cursor may go for an ack of `offset` (passing over skipped entries after it)."""
        if self.inflight:
            nxt = next((o for o in self.inflight if o > offset), None)
            return max(offset, nxt - 1) if nxt is not None else max(offset, self.scanned)
        return max(offset, self.scanned)

    @property
    def reached(self) -> int:
        """How far acks and marks may go: everything up to here was sent to the device, passed over
        for it, or acknowledged (a redelivery pass restarting from the cursor does not lower it)."""
        return max(self._reached, self.scanned, self.cursor)

    def received_upto(self, offset: int) -> list[str]:
        """The messages from other users this stream sent, up to `offset`, not yet acknowledged."""
        return [signal_id for o, signal_id in self.received.items() if o <= offset]

    def trace_of(self, offset: int) -> str | None:
        return self.traces.get(offset)

    # --- the pump ------------------------------------------------------------------------------

    async def _pump(self) -> None:
        try:
            while not self._closed:
                await self._wake.wait()
                self._wake.clear()
                if self._closed:
                    return
                if self._grace_expired:
                    self._grace_expired = False
                    if self.inflight:
                        self._reached = self.reached
                        self.redeliver_upto = max(self.redeliver_upto, self.inflight[-1])
                        self.inflight.clear()
                        self.scanned = self.cursor
                while self._replays:
                    peer, after = self._replays.pop(0)
                    await self._replay(peer, after)
                await self._fill()
                if not self.inflight and self.scanned > self.cursor and self.pending_cursor is None:
                    # Only own or other devices' entries since the cursor: pass over them (M4).
                    await self.hub.advance(self, self.scanned)
        except asyncio.CancelledError:
            raise
        except BimipError as err:
            self.end(err)
        except Exception:
            log.exception("delivery to %s/%s failed", self.eid, self.device_id)
            self.end(BimipError(grpc.StatusCode.UNAVAILABLE, "DELIVERY_FAILED", "delivery failed; reconnect"))

    async def _fill(self) -> None:
        while len(self.inflight) < self.window and not self._closed:
            rows = self.hub.cached(self.eid, self.scanned, PAGE)
            if rows is None:
                if self.scanned >= self.hub.known_head(self.eid):
                    return
                rows = await self.hub.read_log(self.eid, self.scanned, PAGE)
                self.hub.remember(self.eid, rows, complete=len(rows) < PAGE, after=self.scanned)
                if not rows:
                    return
            sent = again = 0  # counted once per page
            try:
                for row in rows:
                    if not row.visible_to(self.eid, self.device_id):
                        self.scanned = row.offset
                        continue
                    if len(self.inflight) >= self.window:
                        return
                    redelivery = row.offset <= self.redeliver_upto
                    await self._send(row, redelivery=redelivery)
                    sent += 1
                    again += redelivery
                    self.inflight.append(row.offset)
                    self.traces[row.offset] = row.trace_context
                    if row.kind == store.KIND_MESSAGE and row.author_eid != self.eid:
                        self.received[row.offset] = row.signal_id
                    self.scanned = row.offset
                    if self._grace_task is None:
                        self._restart_grace()
            finally:
                self.hub.count_delivered(sent, again)

    async def _send(self, row: Row, *, redelivery: bool = False, replay: bool = False) -> None:
        frame = messaging_pb2.ConnectResponse(
            delivery=messaging_pb2.Delivery(redelivery=redelivery, replay=replay)
        )
        frame.delivery.entry.MergeFromString(row.body)  # parsed in place: no copy
        if not self.spans:
            # Nothing is recorded: the device gets the entry's own trace context, as the span
            # below would give (same trace, unrecorded either way), without building the span.
            if row.trace_context:
                frame.trace_context["traceparent"] = row.trace_context
            await self.out.put(frame)
            return
        with self.tracer.start_as_current_span(
            "messaging deliver",
            context=context_of(row.trace_context),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "bimip",
                "messaging.operation.type": "send",
                "bimip.user": self.eid,
                "bimip.device": self.device_id,
                "bimip.offset": row.offset,
                "bimip.signal_id": row.signal_id,
                "bimip.redelivery": redelivery,
                "bimip.replay": replay,
            },
        ):
            if (tp := traceparent_of()) is not None:
                frame.trace_context["traceparent"] = tp
        await self.out.put(frame)

    async def _replay(self, peer: str, after: int) -> None:
        """M11: a conversation's entries after `after`, own included, without moving the cursor."""
        count, position = 0, after
        upto = await self.hub.head(self.eid)
        try:
            while not self._closed:
                rows = await self.hub.read_log(self.eid, position, PAGE, peer_eid=peer, upto=upto)
                for row in rows:
                    position = row.offset
                    if row.target_device is not None and row.target_device != self.device_id:
                        continue
                    await self._send(row, replay=True)
                    count += 1
                if len(rows) < PAGE:
                    break
        finally:
            self.hub.count_delivered(count, 0)
        await self.out.put(
            messaging_pb2.ConnectResponse(
                replay_complete=messaging_pb2.ReplayComplete(peer_eid=peer, after_offset=after, count=count)
            )
        )

    # --- grace (M6) ----------------------------------------------------------------------------

    def _restart_grace(self) -> None:
        self._stop_grace()
        self._grace_task = asyncio.create_task(self._grace_timer())

    def _stop_grace(self) -> None:
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._grace_task = None

    async def _grace_timer(self) -> None:
        await self.clock.sleep(self.grace)
        self._grace_task = None
        if self.inflight and not self._closed:
            self._grace_expired = True
            self._wake.set()


Advance = Callable[[DeviceStream, int], Any]


class Hub:
    """This replica's open device streams and its one bus subscription."""

    def __init__(
        self, engine: AsyncEngine, bus: Bus, tracer: Tracer, replica: str, metrics: Metrics | None = None
    ) -> None:
        self.engine = engine
        self.bus = bus
        self.tracer = tracer
        self.replica = replica
        self.streams: dict[tuple[str, str], DeviceStream] = {}
        self.by_user: dict[str, set[DeviceStream]] = {}
        self._subscription: Subscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._recheck: asyncio.Task[None] | None = None
        self.reads = RunToEnd()
        self._heads: dict[str, int] = {}
        self._tails: dict[str, deque[Row]] = {}
        self._lock = asyncio.Lock()
        self.advance: Advance = _no_advance
        self.metrics = metrics or Metrics()
        self._delivered = self.metrics.delivered_entries
        self._redelivered = self.metrics.redelivered_entries

    async def start(self, recheck_interval: float, clock: Clock) -> None:
        self._subscription = await self.bus.subscribe()
        self._reader = asyncio.create_task(self._read(), name="messaging-hub")
        self._recheck = asyncio.create_task(
            self._recheck_forever(recheck_interval, clock), name="messaging-recheck"
        )

    async def stop(self) -> None:
        for task in (self._reader, self._recheck):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._reader, self._recheck) if t is not None), return_exceptions=True
        )
        if self._subscription is not None:
            await self._subscription.close()

    async def shielded(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a database read to its end even if the caller is cancelled (`RunToEnd`)."""
        return await self.reads.run(work)

    async def read_log(
        self, eid: str, after: int, limit: int, *, peer_eid: str | None = None, upto: int | None = None
    ) -> list[Row]:
        return await self.shielded(read_log(self.engine, eid, after, limit, peer_eid=peer_eid, upto=upto))

    async def head(self, eid: str) -> int:
        return await self.shielded(self._head(eid))

    async def _head(self, eid: str) -> int:
        logs = store.logs
        async with self.engine.connect() as conn:
            head = (await conn.execute(select(logs.c.head).where(logs.c.eid == eid))).scalar()
        return int(head or 0)

    async def _read_heads(self, eids: list[str]) -> list[tuple[str, int]]:
        logs = store.logs
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(logs.c.eid, logs.c.head).where(logs.c.eid.in_(eids)))
            return [(eid, head) for eid, head in rows]

    async def register(self, stream: DeviceStream) -> None:
        """Make `stream` the device's one stream: end any older one, here or on another replica."""
        key = (stream.eid, stream.device_id)
        async with self._lock:
            old = self.streams.get(key)
            self.streams[key] = stream
            self.by_user.setdefault(stream.eid, set()).add(stream)
            if old is not None:
                self._forget(old)
            assert self._subscription is not None
            await self._subscription.add(log_channel(stream.eid), device_channel(*key))
        if old is not None:
            old.end(
                BimipError(
                    grpc.StatusCode.ABORTED,
                    "CONNECTED_ELSEWHERE",
                    "a newer stream for this device replaced this one",
                )
            )
        at, sid = stream.opened
        await self.bus.publish(device_channel(*key), json.dumps({"t": "open", "at": at, "sid": sid}).encode())

    async def unregister(self, stream: DeviceStream) -> None:
        async with self._lock:
            key = (stream.eid, stream.device_id)
            if self.streams.get(key) is not stream:
                return
            self._forget(stream)
            channels = [device_channel(*key)]
            if not self.by_user.get(stream.eid):
                channels.append(log_channel(stream.eid))
            if self._subscription is not None and not self._subscription.closed:
                await self._subscription.remove(*channels)

    def _forget(self, stream: DeviceStream) -> None:
        key = (stream.eid, stream.device_id)
        if self.streams.get(key) is stream:
            del self.streams[key]
        users = self.by_user.get(stream.eid)
        if users is not None:
            users.discard(stream)
            if not users:
                del self.by_user[stream.eid]
                self._tails.pop(stream.eid, None)
                self._heads.pop(stream.eid, None)

    def local(self, eid: str, device_id: str) -> DeviceStream | None:
        return self.streams.get((eid, device_id))

    def log_grew(self, heads: dict[str, int], rows: Sequence[tuple[str, Row]] = ()) -> None:
        """This replica's writer committed: keep the new entries of users with a stream here and
        wake those streams at once (the bus tells the other replicas)."""
        by_eid: dict[str, list[Row]] = {}
        for eid, row in rows:
            if eid in self.by_user:
                by_eid.setdefault(eid, []).append(row)
        for eid, new in by_eid.items():
            self.remember(eid, sorted(new, key=lambda r: r.offset))
        for eid, head in heads.items():
            self.saw_head(eid, head)

    # --- the recent entries of users with a stream here ------------------------------------------
    # Every device stream of a user reads the same new entries: keep the latest of them in memory,
    # fed by this replica's commits and by the streams' own reads, so that most deliveries need no
    # read at all. Offsets in a tail are consecutive; anything that does not follow on restarts it,
    # and whatever a tail does not hold is read from storage (the log is the truth).

    def known_head(self, eid: str) -> int:
        """The highest head this replica has heard of for `eid` (from commits, notices, reads)."""
        return self._heads.get(eid, 1 << 62)

    def head_if_known(self, eid: str) -> int | None:
        return self._heads.get(eid)

    def count_delivered(self, sent: int, again: int) -> None:
        """Entries written to streams (`again` of them redeliveries), counted once per page."""
        if sent:
            self._delivered.inc(sent)
        if again:
            self._redelivered.inc(again)

    def saw_head(self, eid: str, head: int) -> None:
        if eid in self.by_user:
            if head > self._heads.get(eid, 0):
                self._heads[eid] = head
            for stream in self.by_user.get(eid, ()):
                stream.notify(head)

    def cached(self, eid: str, after: int, limit: int) -> list[Row] | None:
        """Up to `limit` entries after `after` from memory, or None when memory does not hold the next."""
        tail = self._tails.get(eid)
        if not tail or tail[0].offset > after + 1 or tail[-1].offset <= after:
            return None
        start = after + 1 - tail[0].offset
        return list(itertools.islice(tail, start, start + limit))

    def remember(self, eid: str, rows: list[Row], *, complete: bool = False, after: int = 0) -> None:
        """Add consecutive entries to `eid`'s tail; `complete` = the read reached the head."""
        if eid not in self.by_user:
            return
        if complete:  # the read reached the head as it was then
            last = rows[-1].offset if rows else after
            self._heads[eid] = max(self._heads.get(eid, 0), last)
        if not rows:
            return
        tail = self._tails.get(eid)
        if tail is None:
            tail = self._tails[eid] = deque(maxlen=TAIL)
        for row in rows:
            if tail and row.offset <= tail[-1].offset:
                continue
            if tail and row.offset != tail[-1].offset + 1:
                tail.clear()
            tail.append(row)

    async def _recheck_forever(self, interval: float, clock: Clock) -> None:
        """The safety net for a missed notice (X5): every interval, one query for the heads of all
        users with a stream here wakes the streams that are behind."""
        while True:
            await clock.sleep(interval)
            users = list(self.by_user)
            try:
                for chunk in chunks(users):
                    for eid, head in await self.shielded(self._read_heads(chunk)):
                        self.saw_head(eid, head)
            except Exception:
                log.warning("hub: head re-check failed", exc_info=True)

    async def _read(self) -> None:
        assert self._subscription is not None
        async for message in self._subscription:
            if message.gap:
                # Notices may have been missed: what this replica knows of heads is stale.
                self._heads.clear()
                for stream in list(self.streams.values()):
                    stream.wake()
            channel = message.channel
            try:
                if channel.startswith("msg-log:"):
                    # Also this replica's own notices: a repeated wake-up costs nothing.
                    eid = channel[len("msg-log:") :]
                    head = int(message.body)
                    with consumer_span(self.tracer, message, "messaging log grew"):
                        self.saw_head(eid, head)
                elif channel.startswith("msg-dev:"):
                    eid, _, device_id = channel[len("msg-dev:") :].partition("/")
                    local = self.streams.get((eid, device_id))
                    if local is not None:
                        local.on_device_event(json.loads(message.body))
            except (ValueError, json.JSONDecodeError):
                log.warning("hub: dropped a malformed message on %s", channel)


async def _no_advance(stream: DeviceStream, offset: int) -> None:
    return None

"""The writes of the messaging service (SPEC M1–M3, M5, M8–M10, A6), each an `Op` for the `Writer`.

Each op checks first and writes after: a refusal (`BimipError`) leaves nothing behind, except
where noted (a device past retention is forgotten as it is told to resynchronise).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy import and_, bindparam, delete, exists, func, select, update

from bimip.common.v1 import common_pb2
from bimip.core.clock import timestamp
from bimip.core.errors import BimipError
from bimip.core.ids import UlidGenerator
from bimip.messaging.v1 import messaging_pb2
from services.messaging import store
from services.messaging.writer import Append, Op, Result, Tx, chunks

SENT = common_pb2.DELIVERY_STATUS_SENT
DELIVERED = common_pb2.DELIVERY_STATUS_DELIVERED
READ = common_pb2.DELIVERY_STATUS_READ
PLAYED = common_pb2.DELIVERY_STATUS_PLAYED


def log_channel(eid: str) -> str:
    """Where a user's log announces its new head (body: the head, in decimal)."""
    return f"msg-log:{eid}"


def device_channel(eid: str, device_id: str) -> str:
    """Where one device's streams hear about each other and about flushes and replays (JSON)."""
    return f"msg-dev:{eid}/{device_id}"


def content_hash(message: common_pb2.Message) -> bytes:
    """What makes two sends "the same" (SPEC §5, M3): recipient, type, payload and end-to-end fields."""
    h = hashlib.sha256()
    for part in (
        message.recipient.eid.encode(),
        message.recipient.device_id.encode(),
        str(int(message.type)).encode(),
        message.payload,
        message.encryption_type.encode(),
        message.encrypted,
        message.signature,
    ):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def _identity(eid: str, device_id: str) -> common_pb2.Identity:
    return common_pb2.Identity(eid=eid, device_id=device_id)


@dataclass
class _Key:
    """A (sender, client id) as it stands: in the database, or taken earlier in this batch."""

    signal_id: str
    server_time: datetime
    content_hash: bytes
    offset: int = 0
    pending: Append | None = None

    def current_offset(self) -> int:
        return self.pending.offset if self.pending is not None else self.offset


# The statements of every batch, built once (building them costs more than running them).
_SENDS_OF = select(
    store.sends.c.sender_eid,
    store.sends.c.client_id,
    store.sends.c.signal_id,
    store.sends.c.offset,
    store.sends.c.server_time,
    store.sends.c.content_hash,
).where(
    store.sends.c.sender_eid.in_(bindparam("senders", expanding=True)),
    store.sends.c.client_id.in_(bindparam("client_ids", expanding=True)),
)
_BLOCKS_OF = select(store.blocks.c.blocker_eid, store.blocks.c.blocked_eid).where(
    store.blocks.c.blocker_eid.in_(bindparam("blockers", expanding=True)),
    store.blocks.c.blocked_eid.in_(bindparam("blocked", expanding=True)),
)
_MOVE_CURSORS = (
    update(store.devices)
    .where(
        store.devices.c.eid == bindparam("b_eid"),
        store.devices.c.device_id == bindparam("b_device"),
        store.devices.c.cursor < bindparam("b_cursor"),
    )
    .values(cursor=bindparam("b_cursor"), last_seen_at=bindparam("b_now"))
)
_MARK_DELIVERED = (
    update(store.messages)
    .where(
        store.messages.c.signal_id.in_(bindparam("signal_ids", expanding=True)),
        store.messages.c.status < DELIVERED,
    )
    .values(status=DELIVERED, delivered_at=bindparam("now"))
    .returning(
        store.messages.c.signal_id,
        store.messages.c.client_id,
        store.messages.c.sender_eid,
        store.messages.c.trace_context,
    )
)


async def prepare_batch(tx: Tx, ops: Sequence[Op]) -> None:
    """Read every idempotency key and block of the batch's sends in two queries."""
    send_ops = [op for op in ops if isinstance(op, SendOp)]
    keys: dict[tuple[str, str], _Key] = {}
    blocked: set[tuple[str, str]] = set()
    tx.cache["sends"], tx.cache["blocked"] = keys, blocked
    if not send_ops:
        return
    # Two plain IN lists rather than a row-value IN, which SQLite answers with a full scan; the
    # few extra rows the cross product may bring are filtered out here.
    wanted = {(op.sender.eid, op.message.client_id) for op in send_ops}
    senders = sorted({eid for eid, _ in wanted})
    for chunk in chunks(sorted({client_id for _, client_id in wanted})):
        rows = await tx.conn.execute(_SENDS_OF, {"senders": senders, "client_ids": chunk})
        for row in rows:
            if (row.sender_eid, row.client_id) in wanted:
                keys[(row.sender_eid, row.client_id)] = _Key(
                    row.signal_id, row.server_time, row.content_hash, row.offset
                )
    pairs = {(op.sender.eid, op.message.recipient.eid) for op in send_ops}
    both = {p for p in pairs | {(b, a) for a, b in pairs} if p[0] != p[1]}
    if not both:
        return
    blockers = sorted({p[0] for p in both})
    for chunk in chunks(sorted({p[1] for p in both})):
        rows = await tx.conn.execute(_BLOCKS_OF, {"blockers": blockers, "blocked": chunk})
        blocked.update(r for r in ((row.blocker_eid, row.blocked_eid) for row in rows) if r in both)


@dataclass(eq=False)
class SendOp:
    """M1–M3: append a validated message to the sender's and the recipient's logs."""

    sender: common_pb2.Identity
    message: common_pb2.Message
    digest: bytes
    dedupe_window: timedelta
    ulids: UlidGenerator
    context: Context | None = None
    traceparent: str | None = None
    name: str = "send"

    async def apply(self, tx: Tx) -> Result:
        keys: dict[tuple[str, str], _Key] = tx.cache["sends"]
        sender, message = self.sender, self.message
        recipient = message.recipient
        key = (sender.eid, message.client_id)
        existing = keys.get(key)
        if existing is not None and (
            existing.pending is not None or existing.server_time >= tx.now - self.dedupe_window
        ):
            if existing.content_hash != self.digest:
                raise BimipError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "CLIENT_ID_REUSED",
                    "this client id was already used for a different message",
                    {"client_id": message.client_id},
                )
            return lambda: messaging_pb2.SendAck(
                client_id=message.client_id,
                signal_id=existing.signal_id,
                offset=existing.current_offset(),
                server_time=timestamp(existing.server_time),
                status=SENT,
                duplicate=True,
            )
        blocked: set[tuple[str, str]] = tx.cache["blocked"]
        if (sender.eid, recipient.eid) in blocked or (recipient.eid, sender.eid) in blocked:
            raise BimipError(
                grpc.StatusCode.PERMISSION_DENIED, "BLOCKED", "messages between these users are blocked"
            )
        if existing is not None:  # an expired key: the client id is free again
            s = store.sends
            await tx.conn.execute(delete(s).where(s.c.sender_eid == key[0], s.c.client_id == key[1]))
        now = tx.now
        signal_id = self.ulids.new(int(now.timestamp() * 1000))
        stored = common_pb2.Message()
        stored.CopyFrom(message)
        stored.signal_id = signal_id
        stored.sender.CopyFrom(sender)
        stored.server_time.CopyFrom(timestamp(now))
        to_self = recipient.eid == sender.eid
        target = recipient.device_id or None
        mine = tx.append(
            sender.eid,
            common_pb2.Entry(
                peer_eid=recipient.eid, author=sender, created_at=timestamp(now), message=stored
            ),
            kind=store.KIND_MESSAGE,
            signal_id=signal_id,
            target_device=target if to_self else None,
            trace_context=self.traceparent,
        )
        theirs = mine
        if not to_self:
            theirs = tx.append(
                recipient.eid,
                common_pb2.Entry(
                    peer_eid=sender.eid, author=sender, created_at=timestamp(now), message=stored
                ),
                kind=store.KIND_MESSAGE,
                signal_id=signal_id,
                target_device=target,
                trace_context=self.traceparent,
            )
        keys[key] = _Key(signal_id, now, self.digest, pending=mine)
        tx.insert_later(
            store.sends,
            lambda: {
                "sender_eid": sender.eid,
                "client_id": message.client_id,
                "signal_id": signal_id,
                "offset": mine.offset,
                "server_time": now,
                "content_hash": self.digest,
            },
        )
        tx.insert_later(
            store.messages,
            lambda: {
                "signal_id": signal_id,
                "client_id": message.client_id,
                "sender_eid": sender.eid,
                "sender_device": sender.device_id,
                "recipient_eid": recipient.eid,
                "recipient_device": target,
                "sender_offset": mine.offset,
                "recipient_offset": theirs.offset,
                "status": SENT,
                "sent_at": now,
                "deleted": False,
                "trace_context": self.traceparent,
            },
        )
        return lambda: messaging_pb2.SendAck(
            client_id=message.client_id,
            signal_id=signal_id,
            offset=mine.offset,
            server_time=timestamp(now),
            status=SENT,
        )


_STATUS_COLUMNS = ("signal_id", "eid", "device_id", "status", "delivered_at", "read_at", "played_at")
_DELIVERED_COLUMNS = ("signal_id", "eid", "device_id", "status", "delivered_at")
_DEVICE_COLUMNS = ("eid", "device_id", "cursor", "first_seen_at", "last_seen_at")


def _do_nothing(insert: Any) -> Any:
    return insert.on_conflict_do_nothing()


def _raise_status(insert: Any) -> Any:
    st = store.statuses
    return insert.on_conflict_do_update(
        index_elements=[st.c.signal_id, st.c.eid, st.c.device_id],
        set_={name: insert.excluded[name] for name in ("status", "delivered_at", "read_at", "played_at")},
    )


async def record_statuses(tx: Tx, eid: str, device_id: str, signal_ids: Sequence[str], status: int) -> int:
    """Raise one recipient device's status on messages (M8); return how many it raised.

    Each aggregate transition appends one receipt to the sender's log, and the first READ (or
    higher) one to the reader's own log. Implied statuses take the time of this event.
    """
    st = store.statuses
    now = tx.now
    by = _identity(eid, device_id)
    raised = 0
    for chunk in chunks(sorted(set(signal_ids))):
        current = {
            row.signal_id: row
            for row in await tx.conn.execute(
                tx.lock(
                    select(st.c.signal_id, st.c.status, st.c.delivered_at, st.c.read_at, st.c.played_at)
                    .where(st.c.eid == eid, st.c.device_id == device_id, st.c.signal_id.in_(chunk))
                    .order_by(st.c.signal_id)
                )
            )
        }
        rows = []
        for signal_id in chunk:
            old = current.get(signal_id)
            if old is not None and old.status >= status:
                continue
            rows.append(
                {
                    "signal_id": signal_id,
                    "eid": eid,
                    "device_id": device_id,
                    "status": status,
                    "delivered_at": (old.delivered_at if old is not None else None) or now,
                    "read_at": ((old.read_at if old is not None else None) or now)
                    if status >= READ
                    else None,
                    "played_at": now if status >= PLAYED else None,
                }
            )
        if not rows:
            continue
        raised += len(rows)
        await tx.conn.execute(
            tx.upsert("messaging: raise statuses", st, _STATUS_COLUMNS, _raise_status), rows
        )
        await _raise_aggregates(tx, [r["signal_id"] for r in rows], status, by, now)
    return raised


def context_of(traceparent: str | None) -> Context | None:
    """The context of a stored W3C `traceparent` ("00-<trace id>-<span id>-<flags>"), parsed
    directly: this runs for every delivery, and the generic propagator costs several times more."""
    if not traceparent or len(traceparent) != 55 or traceparent[:3] != "00-":
        return None
    try:
        span = SpanContext(
            trace_id=int(traceparent[3:35], 16),
            span_id=int(traceparent[36:52], 16),
            is_remote=True,
            trace_flags=TraceFlags(int(traceparent[53:55], 16)),
        )
    except ValueError:
        return None
    return trace.set_span_in_context(NonRecordingSpan(span)) if span.is_valid else None


def traceparent_of(context: Context | None = None) -> str | None:
    """The W3C `traceparent` of the span in `context` (default: the current one), or None."""
    span = trace.get_current_span(context).get_span_context()
    if not span.is_valid:
        return None
    return f"00-{span.trace_id:032x}-{span.span_id:016x}-{int(span.trace_flags):02x}"


def receipt_to_sender(
    tx: Tx, row: Any, status: int, by: common_pb2.Identity, cause: str | None = None
) -> common_pb2.Receipt:
    """M8: append an aggregate transition of the message in `row` to its sender's log, in the
    message's trace: under `cause` (the traceparent of the ack or mark that raised it) when that
    span is in the message's trace, else under the message's own span."""
    receipt = common_pb2.Receipt(
        signal_id=row.signal_id,
        client_id=row.client_id,
        status=common_pb2.DeliveryStatus.ValueType(status),
        by=by,
        at=timestamp(tx.now),
    )
    tx.append(
        row.sender_eid,
        common_pb2.Entry(peer_eid=by.eid, author=by, created_at=timestamp(tx.now), receipt=receipt),
        kind=store.KIND_RECEIPT,
        signal_id=row.signal_id,
        trace_context=cause if _same_trace(cause, row.trace_context) else row.trace_context,
    )
    return receipt


def _same_trace(a: str | None, b: str | None) -> bool:
    return bool(a and b and a[3:35] == b[3:35])


async def _raise_aggregates(
    tx: Tx, signal_ids: list[str], status: int, by: common_pb2.Identity, now: datetime
) -> None:
    m = store.messages
    rows = await tx.conn.execute(
        tx.lock(
            select(
                m.c.signal_id,
                m.c.client_id,
                m.c.sender_eid,
                m.c.recipient_device,
                m.c.status,
                m.c.delivered_at,
                m.c.read_at,
                m.c.trace_context,
            )
            .where(m.c.signal_id.in_(signal_ids), m.c.status < status)
            .order_by(m.c.signal_id)
        )
    )
    changes = []
    for row in rows:
        receipt = receipt_to_sender(tx, row, status, by)
        if status >= READ and row.status < READ:
            tx.append(
                by.eid,
                common_pb2.Entry(
                    peer_eid=row.sender_eid, author=by, created_at=timestamp(now), receipt=receipt
                ),
                kind=store.KIND_RECEIPT,
                signal_id=row.signal_id,
                target_device=row.recipient_device,
                trace_context=row.trace_context,
            )
        changes.append(
            {
                "b_signal": row.signal_id,
                "b_status": status,
                "b_delivered": row.delivered_at or now,
                "b_read": (row.read_at or now) if status >= READ else None,
                "b_played": now if status >= PLAYED else None,
            }
        )
    if changes:
        await tx.conn.execute(
            update(m)
            .where(m.c.signal_id == bindparam("b_signal"))
            .values(
                status=bindparam("b_status"),
                delivered_at=bindparam("b_delivered"),
                read_at=bindparam("b_read"),
                played_at=bindparam("b_played"),
            ),
            changes,
        )


def _visible_to(device_id: str) -> Any:
    e = store.entries
    return (e.c.target_device.is_(None)) | (e.c.target_device == device_id)


@dataclass
class _Acks:
    """The acks of one batch, written with a few bulk statements (see `Tx.batched`)."""

    cursors: dict[tuple[str, str], int] = field(default_factory=dict)
    delivered: dict[str, tuple[str, str]] = field(default_factory=dict)  # signal_id -> first (eid, device)
    pairs: set[tuple[str, str, str]] = field(default_factory=set)
    causes: dict[tuple[str, str], str] = field(default_factory=dict)  # (eid, device) -> ack traceparent

    def add(
        self, eid: str, device_id: str, offset: int, received: Sequence[str], cause: str | None = None
    ) -> None:
        key = (eid, device_id)
        self.cursors[key] = max(offset, self.cursors.get(key, 0))
        if cause is not None:
            self.causes[key] = cause
        for signal_id in received:
            self.delivered.setdefault(signal_id, key)
            self.pairs.add((signal_id, eid, device_id))

    async def flush(self, tx: Tx) -> None:
        st = store.statuses
        now = tx.now
        if self.cursors:
            await tx.conn.execute(
                _MOVE_CURSORS,
                [
                    {"b_eid": e, "b_device": dev, "b_cursor": c, "b_now": now}
                    for (e, dev), c in sorted(self.cursors.items())
                ],
            )
        if not self.pairs:
            return
        # DELIVERED is the first status a device can have: an existing row is already at least that.
        await tx.conn.execute(
            tx.upsert("messaging: statuses delivered", st, _DELIVERED_COLUMNS, _do_nothing),
            [
                {"signal_id": s, "eid": e, "device_id": dev, "status": DELIVERED, "delivered_at": now}
                for s, e, dev in sorted(self.pairs)
            ],
        )
        # The aggregate moves at most once to DELIVERED: the guarded UPDATE returns the rows it moved,
        # and on PostgreSQL a concurrent transaction re-checks the guard after this one commits.
        for chunk in chunks(sorted(self.delivered)):
            moved = await tx.conn.execute(_MARK_DELIVERED, {"signal_ids": chunk, "now": now})
            for row in sorted(moved, key=lambda r: r.signal_id):
                key = self.delivered[row.signal_id]
                receipt_to_sender(tx, row, DELIVERED, _identity(*key), self.causes.get(key))


@dataclass(eq=False)
class AckOp:
    """M5: move a device's cursor forward to `offset`; received messages it covers become DELIVERED.

    The caller has checked that the device may ack that far. `received` names the messages from
    other users the device was sent up to `offset` when the stream knows them; otherwise they are
    read from the log. Answers the cursor after the op.
    """

    eid: str
    device_id: str
    offset: int
    received: Sequence[str] | None = None
    context: Context | None = None
    announce: bool = False
    name: str = "ack"
    moved: int = 0  # how far the cursor moved, when the op read it (`received` not given)

    async def apply(self, tx: Tx) -> Result:
        acks = tx.batched("acks", _Acks)
        received = self.received
        self.moved = 0
        if received is None:
            d, e = store.devices, store.entries
            row = (
                await tx.conn.execute(
                    select(d.c.cursor).where(d.c.eid == self.eid, d.c.device_id == self.device_id)
                )
            ).first()
            if row is None:
                raise BimipError(
                    grpc.StatusCode.NOT_FOUND, "DEVICE_UNKNOWN", "the device has never connected"
                )
            cursor: int = max(row.cursor, acks.cursors.get((self.eid, self.device_id), 0))
            if self.offset <= cursor:
                return lambda: cursor
            self.moved = self.offset - cursor
            received = [
                r.signal_id
                for r in await tx.conn.execute(
                    select(e.c.signal_id).where(
                        e.c.eid == self.eid,
                        e.c.offset > cursor,
                        e.c.offset <= self.offset,
                        e.c.kind == store.KIND_MESSAGE,
                        e.c.author_eid != self.eid,
                        _visible_to(self.device_id),
                    )
                )
            ]
        cause = traceparent_of(self.context) if self.context is not None else None
        acks.add(self.eid, self.device_id, self.offset, received, cause)
        if self.announce:
            tx.publish(
                device_channel(self.eid, self.device_id),
                json.dumps({"t": "cursor", "cursor": self.offset}).encode(),
            )
        offset = self.offset
        return lambda: offset


@dataclass(eq=False)
class MarkOp:
    """M8: READ or PLAYED by one device, of one message or of a peer's messages up to an offset."""

    eid: str
    device_id: str
    status: int
    received_upto: int
    signal_id: str = ""
    peer_eid: str = ""
    up_to_offset: int = 0
    context: Context | None = None
    name: str = "mark"

    async def apply(self, tx: Tx) -> Result:
        m, st = store.messages, store.statuses
        if self.signal_id:
            row = (
                await tx.conn.execute(
                    select(
                        m.c.recipient_eid, m.c.sender_eid, m.c.recipient_device, m.c.recipient_offset
                    ).where(m.c.signal_id == self.signal_id)
                )
            ).first()
            if (
                row is None
                or row.recipient_eid != self.eid
                or row.sender_eid == self.eid
                or (row.recipient_device is not None and row.recipient_device != self.device_id)
            ):
                raise BimipError(
                    grpc.StatusCode.NOT_FOUND,
                    "MESSAGE_NOT_FOUND",
                    "no message with this signal_id was sent to you",
                )
            if row.recipient_offset > self.received_upto:
                raise BimipError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    "NOT_RECEIVED",
                    "this device has not received the message yet",
                    {"offset": str(row.recipient_offset), "received": str(self.received_upto)},
                )
            signal_ids = [self.signal_id]
        else:
            already = exists().where(
                st.c.signal_id == m.c.signal_id,
                st.c.eid == self.eid,
                st.c.device_id == self.device_id,
                st.c.status >= self.status,
            )
            signal_ids = [
                r.signal_id
                for r in await tx.conn.execute(
                    select(m.c.signal_id).where(
                        m.c.recipient_eid == self.eid,
                        m.c.sender_eid == self.peer_eid,
                        m.c.recipient_offset <= self.up_to_offset,
                        (m.c.recipient_device.is_(None)) | (m.c.recipient_device == self.device_id),
                        ~already,
                    )
                )
            ]
        raised = await record_statuses(tx, self.eid, self.device_id, signal_ids, self.status)
        return lambda: raised


@dataclass(eq=False)
class CommandOp:
    """M9: edit, delete for everyone, delete for me; replicated through the logs like receipts."""

    eid: str
    device_id: str
    command: common_pb2.Command
    context: Context | None = None
    traceparent: str | None = None
    name: str = "command"

    async def apply(self, tx: Tx) -> Result:
        m = store.messages
        command = self.command
        row = (
            await tx.conn.execute(
                tx.lock(
                    select(
                        m.c.sender_eid,
                        m.c.recipient_eid,
                        m.c.recipient_device,
                        m.c.deleted,
                        m.c.edit_wall_ms,
                        m.c.edit_counter,
                        m.c.edit_device,
                    ).where(m.c.signal_id == command.signal_id)
                )
            )
        ).first()
        if row is None or self.eid not in (row.sender_eid, row.recipient_eid):
            raise BimipError(
                grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND", "no such message between you and anyone"
            )
        kind = command.kind
        everyone = kind in (common_pb2.COMMAND_KIND_EDIT, common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE)
        if everyone and self.eid != row.sender_eid:
            raise BimipError(
                grpc.StatusCode.PERMISSION_DENIED,
                "NOT_SENDER",
                "only the message's sender may edit or delete it for everyone",
            )
        if everyone and row.deleted:
            raise BimipError(
                grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_DELETED", "the message was deleted for everyone"
            )
        values: dict[str, Any] = {}
        if kind == common_pb2.COMMAND_KIND_EDIT:
            mine = (command.clock.wall_time_ms, command.clock.counter, self.device_id)
            if row.edit_wall_ms is not None and mine <= (row.edit_wall_ms, row.edit_counter, row.edit_device):
                raise BimipError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "EDIT_SUPERSEDED",
                    "a later edit (by hybrid logical clock, then device id) already applies",
                )
            values = {"edit_wall_ms": mine[0], "edit_counter": mine[1], "edit_device": mine[2]}
        elif kind == common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE:
            values = {"deleted": True}
        if values:
            await tx.conn.execute(update(m).where(m.c.signal_id == command.signal_id).values(**values))
        author = _identity(self.eid, self.device_id)
        now = tx.now
        to_self = row.sender_eid == row.recipient_eid
        mine_target = row.recipient_device if self.eid == row.recipient_eid else None
        other = row.recipient_eid if self.eid == row.sender_eid else row.sender_eid
        issued = tx.append(
            self.eid,
            common_pb2.Entry(peer_eid=other, author=author, created_at=timestamp(now), command=command),
            kind=store.KIND_COMMAND,
            signal_id=command.signal_id,
            target_device=mine_target,
            trace_context=self.traceparent,
        )
        if everyone and not to_self:
            tx.append(
                row.recipient_eid,
                common_pb2.Entry(
                    peer_eid=self.eid, author=author, created_at=timestamp(now), command=command
                ),
                kind=store.KIND_COMMAND,
                signal_id=command.signal_id,
                target_device=row.recipient_device,
                trace_context=self.traceparent,
            )
        signal_id = command.signal_id
        return lambda: messaging_pb2.CommandResult(signal_id=signal_id, offset=issued.offset)


@dataclass
class DeviceState:
    cursor: int
    head: int
    first_offset: int


@dataclass(eq=False)
class DeviceSeenOp:
    """M10, X3: register a device or note that it was seen; refuse the 21st and the long-gone."""

    eid: str
    device_id: str
    retention: timedelta
    max_devices: int
    context: Context | None = None
    name: str = "device seen"

    async def apply(self, tx: Tx) -> Result:
        d, logs = store.devices, store.logs
        cutoff = tx.now - self.retention
        where = and_(d.c.eid == self.eid, d.c.device_id == self.device_id)
        row = (await tx.conn.execute(select(d.c.cursor, d.c.last_seen_at).where(where))).first()
        if row is not None and row.last_seen_at < cutoff:
            # Forgotten now, so that its next connection starts it afresh.
            await tx.conn.execute(delete(d).where(where))
            raise BimipError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "RESYNC_REQUIRED",
                "this device was away longer than the device retention; resynchronise from a snapshot",
            )
        log_row = (
            await tx.conn.execute(select(logs.c.head, logs.c.first_offset).where(logs.c.eid == self.eid))
        ).first()
        head, first = (log_row.head, log_row.first_offset) if log_row is not None else (0, 1)
        if row is not None:
            await tx.conn.execute(update(d).where(where).values(last_seen_at=tx.now))
            cursor = row.cursor
        else:
            active = (
                await tx.conn.execute(
                    select(func.count()).select_from(d).where(d.c.eid == self.eid, d.c.last_seen_at >= cutoff)
                )
            ).scalar_one()
            if active >= self.max_devices:
                raise BimipError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "TOO_MANY_DEVICES",
                    f"a user may have at most {self.max_devices} devices seen within the device retention",
                    {"limit": str(self.max_devices)},
                )
            cursor = first - 1
            await tx.conn.execute(
                tx.upsert("messaging: new device", d, _DEVICE_COLUMNS, _do_nothing),
                {
                    "eid": self.eid,
                    "device_id": self.device_id,
                    "cursor": cursor,
                    "first_seen_at": tx.now,
                    "last_seen_at": tx.now,
                },
            )
        state = DeviceState(cursor, head, first)
        return lambda: state


@dataclass(eq=False)
class BlockOp:
    """A6 (reported by awareness): refuse messages in both directions between two users, or stop."""

    blocker_eid: str
    blocked_eid: str
    blocked: bool
    context: Context | None = None
    name: str = "block"

    async def apply(self, tx: Tx) -> Result:
        b = store.blocks
        if self.blocked:
            await tx.conn.execute(
                tx.upsert("messaging: block", b, ("blocker_eid", "blocked_eid", "created_at"), _do_nothing),
                {"blocker_eid": self.blocker_eid, "blocked_eid": self.blocked_eid, "created_at": tx.now},
            )
        else:
            await tx.conn.execute(
                delete(b).where(b.c.blocker_eid == self.blocker_eid, b.c.blocked_eid == self.blocked_eid)
            )
        return lambda: None


@dataclass(eq=False)
class PurgeKeysOp:
    """Forget idempotency keys older than the dedupe window (M3)."""

    before: datetime
    context: Context | None = None
    name: str = "purge keys"

    async def apply(self, tx: Tx) -> Result:
        s = store.sends
        result = await tx.conn.execute(delete(s).where(s.c.server_time < self.before))
        count = int(result.rowcount or 0)
        return lambda: count

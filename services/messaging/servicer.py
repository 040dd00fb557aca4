"""gRPC face of the messaging service: protobuf in and out, checks, domain errors to gRPC status.

`Messaging` holds the service's parts (the writer, the hub of device streams, the limits);
`MessagingServicer` is the client API (SPEC §1) and `MessagingInternalServicer` the streams
awareness and sync use (SPEC X1, M11, S7), which accept service credentials only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from sqlalchemy import select

from bimip.common.v1 import common_pb2
from bimip.core.auth import Principal, current_principal
from bimip.core.clock import timestamp
from bimip.core.errors import BimipError, invalid
from bimip.core.ids import UlidGenerator, device_id_problem, eid_problem
from bimip.core.pubsub import BusError
from bimip.core.server import Runtime
from bimip.core.storage import create_engine
from bimip.core.streams import RunToEnd, open_frame
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc, messaging_pb2, messaging_pb2_grpc
from services.messaging import store
from services.messaging.config import MessagingSettings
from services.messaging.delivery import MAX_BATCH, Closed, DeviceStream, Hub, Row, take_batch
from services.messaging.ops import (
    PLAYED,
    READ,
    AckOp,
    BlockOp,
    CommandOp,
    DeviceSeenOp,
    DeviceState,
    MarkOp,
    PurgeKeysOp,
    SendOp,
    content_hash,
    context_of,
    device_channel,
    log_channel,
    prepare_batch,
    traceparent_of,
)
from services.messaging.writer import Append, Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ENCRYPTION_TYPE_BYTES = 64
MAX_SIGNAL_ID_BYTES = 64
MAX_APPEND_BATCH = 1000
MAX_PAGE_SIZE = 1000
SEEN_REFRESH_S = 60.0
MAX_ACK_LOOKAHEAD = 10_000
_DELETE_IF_MINE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


def _out_of_range(reason: str, message: str, **metadata: str) -> BimipError:
    return BimipError(grpc.StatusCode.OUT_OF_RANGE, reason, message, metadata)


def check_identity(identity: common_pb2.Identity, field: str, *, device: bool) -> None:
    problem = eid_problem(identity.eid)
    if problem is not None:
        raise invalid("INVALID_EID", f"{field}.eid {problem}", field=f"{field}.eid")
    if device:
        problem = device_id_problem(identity.device_id)
        if problem is not None:
            raise invalid("INVALID_DEVICE_ID", f"{field}.device_id {problem}", field=f"{field}.device_id")


class TokenBucket:
    """X3: sends per device, `rate` per second sustained with bursts of `burst`."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Messaging:
    """The messaging service's parts, shared by its two servicers."""

    def __init__(self, runtime: Runtime, settings: MessagingSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.clock = runtime.clock
        self.tracer = runtime.telemetry.tracer("bimip.messaging")
        self.engine = runtime.engine
        self.writer_engine = create_engine(settings.database_url, writer=True)
        runtime.telemetry.instrument_engine(self.writer_engine)
        self.hub = Hub(runtime.engine, runtime.bus, self.tracer, settings.replica_id, runtime.metrics)
        self.writer = Writer(
            self.writer_engine,
            runtime.clock,
            self.tracer,
            batch_max=settings.batch_max,
            prepare=prepare_batch,
            on_commit=self._committed,
            metrics=runtime.metrics,
        )
        self.hub.advance = self._pass_over
        self.ulids = UlidGenerator()
        self.dedupe_window = timedelta(seconds=settings.dedupe_window_s)
        self.retention = timedelta(days=settings.device_retention_days)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._purger: asyncio.Task[None] | None = None
        self.sessions: set[_Session] = set()
        self.closing = RunToEnd()
        self.links: set[_LogLink] = set()
        metrics = runtime.metrics
        self._sent = {via: metrics.sent_messages.labels(via) for via in ("stream", "unary", "sync")}
        self._duplicate_sends = metrics.duplicate_sends
        self._send_refusals = metrics.send_refusals
        self._acks = {via: metrics.acks.labels(via) for via in ("stream", "sync")}
        self._acked_entries = {via: metrics.acked_entries.labels(via) for via in ("stream", "sync")}
        self._device_lag = metrics.device_lag
        self.connect_streams = metrics.open_streams.labels("messaging", "connect")
        self.log_links = metrics.open_streams.labels("messaging", "log_link")

    async def start(self) -> None:
        self.writer.start()
        await self.hub.start(self.settings.heartbeat_interval_s, self.clock)
        self._purger = asyncio.create_task(self._purge_keys_forever(), name="messaging-purge-keys")

    async def _purge_keys_forever(self) -> None:
        """M3: idempotency keys older than the dedupe window are removed (a quarter window apart,
        at most an hour); an expired key that is still there is treated as absent anyway."""
        interval = min(3600.0, self.settings.dedupe_window_s / 4)
        while True:
            await self.clock.sleep(interval)
            try:
                removed = await self.writer.submit(PurgeKeysOp(self.clock.now() - self.dedupe_window))
                if removed:
                    log.info("messaging: forgot %d idempotency key(s) past the dedupe window", removed)
            except BimipError:
                return  # shutting down
            except Exception:
                log.warning("messaging: purging idempotency keys failed", exc_info=True)

    async def stop(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
        shutting = BimipError(
            grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; reconnect"
        )
        for stream in list(self.hub.streams.values()):
            stream.end(shutting)
        # Nothing of a stream may still read or write once the engines are disposed.
        tasks: list[asyncio.Future[Any]] = [t for session in list(self.sessions) for t in session.cancel()]
        tasks += [t for link in list(self.links) for t in link.cancel()]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.closing.drain()
        await self.hub.reads.drain()
        await self.writer.stop()
        await self.hub.stop()
        await self.writer_engine.dispose()

    async def _committed(
        self, heads: dict[str, int], events: list[tuple[str, bytes]], appended: list[Append]
    ) -> None:
        """After a commit: hand the new entries to this replica's streams, tell the other replicas
        (X5, X8)."""
        self.hub.log_grew(heads, [(a.eid, Row.of(a)) for a in appended])
        items = [(log_channel(eid), str(head).encode()) for eid, head in heads.items()] + events
        with self.tracer.start_as_current_span(
            "messaging publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis" if self.runtime.redis is not None else "in-process",
                "messaging.operation.type": "publish",
                "messaging.batch.message_count": len(items),
            },
        ):
            try:
                await self.runtime.bus.publish_many(items)
            except BusError as exc:
                log.warning("messaging: %d notice(s) not published after commit: %s", len(items), exc)

    async def _pass_over(self, stream: DeviceStream, offset: int) -> None:
        """M4: a device's cursor passes over its own entries and other devices' entries."""
        stream.pending_cursor = offset
        try:
            cursor = await self.writer.submit(
                AckOp(stream.eid, stream.device_id, offset, received=stream.received_upto(offset))
            )
        finally:
            stream.pending_cursor = None
        stream.cursor_moved(cursor)
        await stream.out.put(
            messaging_pb2.ConnectResponse(cursor=messaging_pb2.CursorUpdate(cursor=stream.cursor))
        )

    def count_ack(self, via: str, moved: int, cursor: int, head: int | None) -> None:
        """Metrics: an acknowledgement moved a device's cursor `moved` offsets forward, to `cursor`;
        `head` is its user's log head when known (the device's lag)."""
        if moved > 0:
            self._acks[via].inc()
            self._acked_entries[via].inc(moved)
            if head is not None:
                self._device_lag.observe(max(0, head - cursor))

    # --- shared checks ---------------------------------------------------------------------------

    async def device_seen(self, eid: str, device_id: str, *, force: bool = False) -> DeviceState | None:
        """Register the device or note it was seen (M10, X3); at most once a minute unless forced."""
        key = (eid, device_id)
        now = self.clock.monotonic()
        last = self._seen.get(key)
        if not force and last is not None and now - last < SEEN_REFRESH_S:
            return None
        state: DeviceState = await self.writer.submit(
            DeviceSeenOp(eid, device_id, self.retention, self.settings.max_devices)
        )
        if len(self._seen) > 100_000:
            self._seen.clear()
        self._seen[key] = now
        return state

    def check_rate(self, eid: str, device_id: str) -> None:
        now = self.clock.monotonic()
        bucket = self._buckets.get((eid, device_id))
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets[(eid, device_id)] = TokenBucket(
                self.settings.send_rate, self.settings.send_burst, now
            )
        if not bucket.take(now):
            raise BimipError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
                f"more than {self.settings.send_rate:g} sends per second from this device",
                {"rate": f"{self.settings.send_rate:g}", "burst": str(self.settings.send_burst)},
            )

    def check_message(self, message: common_pb2.Message) -> None:
        """M1, X3: every field of a message to send."""
        s = self.settings
        if not message.client_id:
            raise invalid("CLIENT_ID_REQUIRED", "client_id is empty", field="client_id")
        if len(message.client_id.encode()) > s.max_client_id_bytes:
            raise invalid(
                "CLIENT_ID_TOO_LONG",
                f"client_id is longer than {s.max_client_id_bytes} bytes",
                field="client_id",
                limit=str(s.max_client_id_bytes),
            )
        problem = eid_problem(message.recipient.eid)
        if problem is not None:
            raise invalid("INVALID_RECIPIENT", f"recipient.eid {problem}", field="recipient.eid")
        if message.recipient.device_id:
            problem = device_id_problem(message.recipient.device_id)
            if problem is not None:
                raise invalid(
                    "INVALID_RECIPIENT", f"recipient.device_id {problem}", field="recipient.device_id"
                )
        if message.type not in (common_pb2.MESSAGE_TYPE_CHAT, common_pb2.MESSAGE_TYPE_PUSH_NOTIFICATION):
            raise invalid(
                "INVALID_MESSAGE_TYPE",
                f"type {int(message.type)} is not CHAT (1) or PUSH_NOTIFICATION (2)",
                field="type",
            )
        self.check_content(message.payload, message.encrypted, message.signature, message.encryption_type)

    def check_content(self, payload: bytes, encrypted: bytes, signature: bytes, encryption_type: str) -> None:
        limit = self.settings.max_payload_bytes
        if not payload and not encrypted:
            raise invalid(
                "PAYLOAD_REQUIRED", "a message needs a payload or encrypted content", field="payload"
            )
        size = len(payload) + len(encrypted) + len(signature)
        if size > limit:
            raise invalid(
                "PAYLOAD_TOO_LARGE",
                f"payload + encrypted + signature is {size} bytes; the limit is {limit}",
                field="payload",
                limit=str(limit),
            )
        if len(encryption_type.encode()) > MAX_ENCRYPTION_TYPE_BYTES:
            raise invalid(
                "INVALID_ENCRYPTION_TYPE",
                f"encryption_type is longer than {MAX_ENCRYPTION_TYPE_BYTES} bytes",
                field="encryption_type",
            )

    def send_op(
        self, sender: common_pb2.Identity, message: common_pb2.Message, context: Context | None
    ) -> SendOp:
        clean = common_pb2.Message()
        clean.CopyFrom(message)
        clean.ClearField("signal_id")
        clean.ClearField("sender")
        clean.ClearField("server_time")
        return SendOp(
            sender,
            clean,
            content_hash(clean),
            self.dedupe_window,
            self.ulids,
            context=context,
            traceparent=traceparent_of(context) if context is not None else None,
        )

    async def send(
        self,
        principal: Principal,
        message: common_pb2.Message,
        parent: Context | None,
        links: Sequence[Link] = (),
        *,
        via: str = "stream",
    ) -> messaging_pb2.SendAck:
        """M1–M3 for one message from the authenticated device; `parent` None = the current span;
        `via` is how it came (stream, unary or sync), for the metrics."""
        with self.tracer.start_as_current_span(
            "messaging send",
            context=parent,
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={
                "bimip.user": principal.eid,
                "bimip.device": principal.device_id,
                "bimip.recipient": message.recipient.eid,
            },
        ) as span:
            try:
                self.check_message(message)
                self.check_rate(principal.eid, principal.device_id)
                sender = common_pb2.Identity(eid=principal.eid, device_id=principal.device_id)
                ack: messaging_pb2.SendAck = await self.writer.submit(
                    self.send_op(sender, message, trace.set_span_in_context(span))
                )
            except BimipError as err:
                self._send_refusals.labels(err.reason).inc()
                raise
            (self._duplicate_sends if ack.duplicate else self._sent[via]).inc()
            span.set_attribute("bimip.signal_id", ack.signal_id)
            span.set_attribute("bimip.offset", ack.offset)
            span.set_attribute("bimip.duplicate", ack.duplicate)
            return ack

    def check_mark(self, mark: messaging_pb2.MarkRequest) -> None:
        if mark.status not in (READ, PLAYED):
            raise invalid(
                "INVALID_STATUS",
                "a mark is DELIVERY_STATUS_READ (3) or DELIVERY_STATUS_PLAYED (4)",
                field="status",
            )
        target = mark.WhichOneof("target")
        if target == "signal_id":
            if len(mark.signal_id.encode()) > MAX_SIGNAL_ID_BYTES or not mark.signal_id:
                raise invalid("INVALID_SIGNAL_ID", "signal_id is empty or too long", field="signal_id")
        elif target == "peer_range":
            problem = eid_problem(mark.peer_range.peer_eid)
            if problem is not None:
                raise invalid("INVALID_EID", f"peer_range.peer_eid {problem}", field="peer_range.peer_eid")
            if mark.peer_range.up_to_offset < 1:
                raise invalid(
                    "INVALID_OFFSET",
                    "peer_range.up_to_offset must be at least 1",
                    field="peer_range.up_to_offset",
                )
        else:
            raise invalid("TARGET_REQUIRED", "a mark names a signal_id or a peer_range", field="target")

    def check_command(self, command: common_pb2.Command) -> None:
        if not command.signal_id or len(command.signal_id.encode()) > MAX_SIGNAL_ID_BYTES:
            raise invalid("INVALID_SIGNAL_ID", "signal_id is empty or too long", field="signal_id")
        if command.kind not in (
            common_pb2.COMMAND_KIND_EDIT,
            common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE,
            common_pb2.COMMAND_KIND_DELETE_FOR_ME,
        ):
            raise invalid("INVALID_COMMAND_KIND", f"kind {int(command.kind)} is not 1, 2 or 3", field="kind")
        if command.clock.wall_time_ms <= 0:
            raise invalid(
                "INVALID_CLOCK", "a command carries the device's hybrid logical clock", field="clock"
            )
        if command.kind == common_pb2.COMMAND_KIND_EDIT:
            self.check_content(command.payload, command.encrypted, command.signature, command.encryption_type)

    async def device_statuses(self, eid: str) -> messaging_pb2.GetCommitOffsetResponse:
        """M10: the unified commit offset and every device's position."""
        cutoff = self.clock.now() - self.retention
        rows, head = await self.hub.shielded(self._device_rows(eid))
        response = messaging_pb2.GetCommitOffsetResponse(head=int(head or 0))
        active = []
        for row in rows:
            is_active = row.last_seen_at >= cutoff
            if is_active:
                active.append(row.cursor)
            response.devices.append(
                messaging_pb2.DeviceCursor(
                    device_id=row.device_id,
                    cursor=row.cursor,
                    last_seen=timestamp(row.last_seen_at),
                    active=is_active,
                )
            )
        response.commit_offset = min(active) if active else 0
        return response

    async def _device_rows(self, eid: str) -> tuple[list[Any], int | None]:
        d, logs = store.devices, store.logs
        async with self.engine.connect() as conn:
            rows = list(
                await conn.execute(
                    select(d.c.device_id, d.c.cursor, d.c.last_seen_at)
                    .where(d.c.eid == eid)
                    .order_by(d.c.device_id)
                )
            )
            head = (await conn.execute(select(logs.c.head).where(logs.c.eid == eid))).scalar()
        return rows, head

    async def log_bounds(self, eid: str) -> tuple[int, int]:
        """A log's head and first retained offset."""

        async def read() -> tuple[int, int]:
            logs = store.logs
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(select(logs.c.head, logs.c.first_offset).where(logs.c.eid == eid))
                ).first()
            return (row.head, row.first_offset) if row is not None else (0, 1)

        return await self.hub.shielded(read())

    async def message_rows(self, signal_id: str) -> tuple[Any, list[Any]]:
        """A message's row and its per-device status rows."""

        async def read() -> tuple[Any, list[Any]]:
            m, st = store.messages, store.statuses
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(m).where(m.c.signal_id == signal_id))).first()
                devices = list(
                    await conn.execute(select(st).where(st.c.signal_id == signal_id).order_by(st.c.device_id))
                )
            return row, devices

        return await self.hub.shielded(read())

    async def connected(self, eid: str, device_id: str) -> bool:
        """Whether the device has a stream here or (with Redis) on another replica."""
        if self.hub.local(eid, device_id) is not None:
            return True
        redis = self.runtime.redis
        if redis is None:
            return False
        return bool(await redis.exists(self.connection_key(eid, device_id)))

    def connection_key(self, eid: str, device_id: str) -> str:
        return f"{self.settings.redis_namespace}:msg-conn:{eid}/{device_id}"

    async def tell_device(self, eid: str, device_id: str, event: dict[str, Any]) -> None:
        """Deliver a device event to its stream, on whichever replica holds it, through the bus."""
        await self.runtime.bus.publish(device_channel(eid, device_id), json.dumps(event).encode())


def _frame_context(carrier: Any) -> Context | None:
    return propagate.extract(dict(carrier)) if carrier else None


_INTERNAL_SERVICE = internal_pb2.DESCRIPTOR.services_by_name["MessagingInternalService"].full_name


def _link_span(core: Messaging, method: str, op: str | None, carrier: Any) -> Any:
    """A SERVER span for one request on an internal stream, a child of the requester's span when
    the frame carries its trace context (else of the stream's)."""
    return core.tracer.start_as_current_span(
        f"messaging link {op or 'empty'}",
        context=_frame_context(carrier),
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": _INTERNAL_SERVICE,
            "rpc.method": method,
            "bimip.op": op or "",
        },
    )


class MessagingServicer(messaging_pb2_grpc.MessagingServiceServicer):
    """The client-facing API (SPEC §1)."""

    def __init__(self, core: Messaging) -> None:
        self.core = core

    async def Connect(  # type: ignore[override]  # also yields packed frames (bytes): see app.py
        self,
        request_iterator: AsyncIterator[messaging_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[messaging_pb2.ConnectResponse | bytes]:
        core = self.core
        principal = current_principal()
        try:
            opened = await open_frame(request_iterator, core.settings.heartbeat_interval_s * 3)
        except BimipError as err:
            await err.abort(context)
        if opened is None:
            return
        first = opened
        if first.open.processed_offset < 0:
            await invalid(
                "INVALID_OFFSET", "processed_offset must not be negative", field="processed_offset"
            ).abort(context)
        if first.open.max_batch < 0:
            await invalid("INVALID_BATCH", "max_batch must not be negative", field="max_batch").abort(context)
        try:
            state = await core.device_seen(principal.eid, principal.device_id, force=True)
        except BimipError as err:
            await err.abort(context)
        assert state is not None
        if first.open.processed_offset > state.head:
            await _out_of_range(
                "ACK_BEYOND_HEAD",
                "processed_offset is beyond the end of your log",
                head=str(state.head),
            ).abort(context)
        settings = core.settings
        stream = DeviceStream(
            core.hub,
            principal.eid,
            principal.device_id,
            state.cursor,
            window=settings.window,
            grace=settings.grace_period_s,
            clock=core.clock,
            tracer=core.tracer,
            queue_size=settings.window + 64,
            spans=core.runtime.telemetry.exporting,
        )
        if first.open.processed_offset > state.cursor:
            # What the device already processed counts as acknowledged (never moving back).
            processed = AckOp(stream.eid, stream.device_id, first.open.processed_offset)
            stream.cursor_moved(await core.writer.submit(processed))
            core.count_ack("stream", processed.moved, stream.cursor, state.head)
        batch = max(1, min(first.open.max_batch, MAX_BATCH, settings.window))
        session = _Session(core, stream, principal)
        core.sessions.add(session)
        core.connect_streams.inc()
        try:
            try:
                await core.hub.register(stream)
            except BusError:
                await BimipError(
                    grpc.StatusCode.UNAVAILABLE, "BUS_UNAVAILABLE", "pub/sub is unreachable; retry"
                ).abort(context)
            yield messaging_pb2.ConnectResponse(
                seq=first.seq,
                opened=messaging_pb2.OpenResponse(
                    cursor=stream.cursor,
                    head=max(state.head, stream.cursor),
                    heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
                    grace_period_ms=int(settings.grace_period_s * 1000),
                    window=settings.window,
                    max_batch=batch,
                ),
            )
            session.start(request_iterator)
            out = stream.out
            while True:
                item = await out.get()
                if isinstance(item, Closed):
                    if item.error is not None:
                        await item.error.abort(context)
                    return
                yield take_batch(item, out, batch)  # deliveries ready together go as one frame
        finally:
            core.connect_streams.dec()
            # To its end: a handler cancelled again while it waits still unregisters.
            with contextlib.suppress(asyncio.CancelledError):
                await core.closing.run(session.close())

    async def SendMessage(
        self, request: messaging_pb2.SendMessageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> messaging_pb2.SendMessageResponse:
        principal = current_principal()
        try:
            await self.core.device_seen(principal.eid, principal.device_id)
            ack = await self.core.send(principal, request.message, None, via="unary")
        except BimipError as err:
            await err.abort(context)
        return messaging_pb2.SendMessageResponse(ack=ack)

    async def GetMessageStatus(
        self, request: messaging_pb2.GetMessageStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> messaging_pb2.GetMessageStatusResponse:
        principal = current_principal()
        core = self.core
        try:
            await core.device_seen(principal.eid, principal.device_id)
            if not request.signal_id or len(request.signal_id.encode()) > MAX_SIGNAL_ID_BYTES:
                raise invalid("INVALID_SIGNAL_ID", "signal_id is empty or too long", field="signal_id")
            row, devices = await core.message_rows(request.signal_id)
            if row is None or principal.eid not in (row.sender_eid, row.recipient_eid):
                raise BimipError(
                    grpc.StatusCode.NOT_FOUND,
                    "MESSAGE_NOT_FOUND",
                    "no message with this signal_id between you and anyone",
                )
        except BimipError as err:
            await err.abort(context)
        response = messaging_pb2.GetMessageStatusResponse(
            signal_id=row.signal_id,
            client_id=row.client_id,
            sender=common_pb2.Identity(eid=row.sender_eid, device_id=row.sender_device),
            recipient=common_pb2.Identity(eid=row.recipient_eid, device_id=row.recipient_device or ""),
            aggregate=row.status,
            sent_at=timestamp(row.sent_at),
        )
        for name in ("delivered_at", "read_at", "played_at"):
            if getattr(row, name) is not None:
                getattr(response, name).CopyFrom(timestamp(getattr(row, name)))
        for device in devices:
            status = messaging_pb2.DeviceStatus(
                device=common_pb2.Identity(eid=device.eid, device_id=device.device_id), status=device.status
            )
            for name in ("delivered_at", "read_at", "played_at"):
                if getattr(device, name) is not None:
                    getattr(status, name).CopyFrom(timestamp(getattr(device, name)))
            response.devices.append(status)
        return response

    async def GetCommitOffset(
        self, request: messaging_pb2.GetCommitOffsetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> messaging_pb2.GetCommitOffsetResponse:
        principal = current_principal()
        try:
            await self.core.device_seen(principal.eid, principal.device_id)
        except BimipError as err:
            await err.abort(context)
        return await self.core.device_statuses(principal.eid)


class _Session:
    """The client half of one Connect stream: its frames, acks and heartbeats."""

    def __init__(self, core: Messaging, stream: DeviceStream, principal: Principal) -> None:
        self.core = core
        self.stream = stream
        self.principal = principal
        self.sender = common_pb2.Identity(eid=principal.eid, device_id=principal.device_id)
        self.acks: list[tuple[int, int, Context | None]] = []  # offset, seq, parent; for the ack loop
        stream_span = trace.get_current_span().get_span_context()
        self.links = [Link(stream_span)] if stream_span.is_valid else []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.acking: asyncio.Future[Any] | None = None  # the ack loop, while acks wait for it

    def start(self, requests: AsyncIterator[messaging_pb2.ConnectRequest]) -> None:
        self.stream.start()
        for coro in (self._read(requests), self._heartbeat()):
            self._spawn(coro)

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Stop everything this stream runs, at once; returns the tasks to await."""
        self.stream.end(None)
        tasks = [*self.tasks, *self.stream.cancel()]
        for task in tasks:
            task.cancel()
        return tasks

    async def close(self) -> None:
        await asyncio.gather(*self.cancel(), return_exceptions=True)
        self.core.sessions.discard(self)
        with contextlib.suppress(BusError):  # Redis gone: the subscription is dropped with it
            await self.core.hub.unregister(self.stream)
        redis = self.core.runtime.redis
        if redis is not None:
            # Only this stream's own mark: a newer stream (on any replica) may have set it since.
            with contextlib.suppress(Exception):
                key = self.core.connection_key(self.stream.eid, self.stream.device_id)
                await redis.eval(_DELETE_IF_MINE, 1, key, self.stream.sid)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _put(self, frame: messaging_pb2.ConnectResponse) -> None:
        if not self.stream.closed:
            await self.stream.out.put(frame)

    async def _error(self, seq: int, err: BimipError) -> None:
        await self._put(messaging_pb2.ConnectResponse(seq=seq, error=err.to_proto()))

    async def _read(self, requests: AsyncIterator[messaging_pb2.ConnectRequest]) -> None:
        try:
            async for request in requests:
                if self.stream.closed:
                    return
                await self._frame(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the transport failed: the stream is over
            log.debug("stream read ended: %r", exc)
        self.stream.end(None)

    async def _frame(self, request: messaging_pb2.ConnectRequest) -> None:
        which = request.WhichOneof("frame")
        seq = request.seq
        parent = _frame_context(request.trace_context)
        if which == "send":  # checked in `send`, before anything is queued
            self._spawn(self._send(seq, request.send.message, parent))
        elif which == "ack":
            if request.ack.offset < 0:
                await self._error(
                    seq, invalid("INVALID_OFFSET", "an ack offset must not be negative", field="offset")
                )
                return
            self.acks.append((request.ack.offset, seq, parent))
            if self.acking is None:  # an idle stream keeps no ack task
                self.acking = self._spawn(self._ack_loop())
        elif which == "mark":
            self._spawn(self._mark(seq, request.mark, parent))
        elif which == "command":
            self._spawn(self._command(seq, request.command.command, parent))
        elif which == "heartbeat":
            pass
        elif which == "open":
            await self._error(
                seq,
                BimipError(grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_OPEN", "the stream is already open"),
            )
        else:
            await self._error(
                seq, invalid("FRAME_EMPTY", "the frame carries nothing (unknown or missing frame)")
            )

    async def _send(self, seq: int, message: common_pb2.Message, parent: Context | None) -> None:
        # A message's trace is its own (the client's, if the frame carries one), linked to the
        # stream's: a long-lived stream must not make one endless trace of every message.
        try:
            ack = await self.core.send(self.principal, message, parent or Context(), self.links)
        except BimipError as err:
            await self._error(seq, err)
            return
        await self._put(messaging_pb2.ConnectResponse(seq=seq, sent=ack))

    async def _mark(self, seq: int, mark: messaging_pb2.MarkRequest, parent: Context | None) -> None:
        stream = self.stream
        try:
            self.core.check_mark(mark)
            received = stream.reached
            if mark.WhichOneof("target") == "peer_range" and mark.peer_range.up_to_offset > received:
                raise _out_of_range(
                    "NOT_RECEIVED",
                    "up_to_offset is beyond what this device has received",
                    received=str(received),
                )
            with self.core.tracer.start_as_current_span(
                "messaging mark",
                context=parent or Context(),
                links=self.links,
                attributes={"bimip.user": stream.eid, "bimip.device": stream.device_id},
            ) as span:
                updated = await self.core.writer.submit(
                    MarkOp(
                        stream.eid,
                        stream.device_id,
                        mark.status,
                        received,
                        signal_id=mark.signal_id,
                        peer_eid=mark.peer_range.peer_eid,
                        up_to_offset=mark.peer_range.up_to_offset,
                        context=trace.set_span_in_context(span),
                    )
                )
        except BimipError as err:
            await self._error(seq, err)
            return
        await self._put(
            messaging_pb2.ConnectResponse(
                seq=seq, marked=messaging_pb2.MarkResult(status=mark.status, updated=updated)
            )
        )

    async def _command(self, seq: int, command: common_pb2.Command, parent: Context | None) -> None:
        stream = self.stream
        try:
            self.core.check_command(command)
            with self.core.tracer.start_as_current_span(
                "messaging command",
                context=parent or Context(),
                links=self.links,
                attributes={
                    "bimip.user": stream.eid,
                    "bimip.device": stream.device_id,
                    "bimip.signal_id": command.signal_id,
                },
            ) as span:
                ctx = trace.set_span_in_context(span)
                result = await self.core.writer.submit(
                    CommandOp(
                        stream.eid, stream.device_id, command, context=ctx, traceparent=traceparent_of(ctx)
                    )
                )
        except BimipError as err:
            await self._error(seq, err)
            return
        await self._put(messaging_pb2.ConnectResponse(seq=seq, command_result=result))

    async def _ack_loop(self) -> None:
        """Acks in order; those that queue up while one is written are written as one (the highest).
        Runs while there are acks: it ends when none is left (`_frame` starts it again)."""
        try:
            await self._write_acks()
        finally:
            self.acking = None

    async def _write_acks(self) -> None:
        stream, core = self.stream, self.core
        while self.acks:  # nothing awaited between this check and the loop's end
            pending, self.acks = self.acks, []
            accepted: list[int] = []
            highest, parent = stream.cursor, None
            for offset, seq, frame_parent in pending:
                try:
                    if offset > stream.reached:
                        await self._check_passed_over(offset)
                except BimipError as err:
                    await self._error(seq, err)
                    continue
                accepted.append(seq)
                if offset > highest:
                    highest, parent = offset, frame_parent or context_of(stream.trace_of(offset))
            if highest > stream.cursor:
                target = stream.acked_position(highest)
                before = stream.cursor
                with core.tracer.start_as_current_span(
                    "messaging ack",
                    context=parent or Context(),
                    kind=SpanKind.CONSUMER,
                    links=self.links,
                    attributes={
                        "messaging.system": "bimip",
                        "messaging.operation.type": "settle",
                        "bimip.user": stream.eid,
                        "bimip.device": stream.device_id,
                        "bimip.offset": highest,
                    },
                ) as span:
                    stream.pending_cursor = target
                    try:
                        cursor = await core.writer.submit(
                            AckOp(
                                stream.eid,
                                stream.device_id,
                                target,
                                received=stream.received_upto(target),
                                context=trace.set_span_in_context(span),
                            )
                        )
                    except BimipError as err:
                        for seq in accepted:
                            await self._error(seq, err)
                        continue
                    finally:
                        stream.pending_cursor = None
                stream.cursor_moved(cursor)
                core.count_ack(
                    "stream", stream.cursor - before, stream.cursor, core.hub.head_if_known(stream.eid)
                )
            for seq in accepted:
                await self._put(
                    messaging_pb2.ConnectResponse(
                        seq=seq, cursor=messaging_pb2.CursorUpdate(cursor=stream.cursor)
                    )
                )

    async def _check_passed_over(self, offset: int) -> None:
        """M5, §5: an ack beyond what was sent is allowed only over the device's own (or other
        devices') entries right after what it was sent."""
        stream = self.stream
        start = stream.reached
        refuse = _out_of_range(
            "ACK_BEYOND_DELIVERED",
            "this ack covers entries the device was not sent",
            delivered=str(start),
        )
        if offset - start > MAX_ACK_LOOKAHEAD:
            raise refuse
        rows = await self.core.hub.read_log(stream.eid, start, offset - start, upto=offset)
        if len(rows) != offset - start or any(r.visible_to(stream.eid, stream.device_id) for r in rows):
            if offset <= stream.reached:  # the pump caught up meanwhile
                return
            raise refuse

    async def _heartbeat(self) -> None:
        core, stream = self.core, self.stream
        interval = core.settings.heartbeat_interval_s
        redis = core.runtime.redis
        key = core.connection_key(stream.eid, stream.device_id)
        while not stream.closed:
            if redis is not None:
                with contextlib.suppress(Exception):
                    await redis.set(key, stream.sid, ex=max(1, int(interval * 3)))
            await core.clock.sleep(interval)
            await self._put(
                messaging_pb2.ConnectResponse(
                    heartbeat=common_pb2.Heartbeat(sent_at=timestamp(core.clock.now()))
                )
            )


class MessagingInternalServicer(internal_pb2_grpc.MessagingInternalServiceServicer):
    """The streams awareness and sync use (SPEC X1, M11, S7); service credentials only."""

    def __init__(self, core: Messaging) -> None:
        self.core = core

    async def PresenceLink(
        self,
        request_iterator: AsyncIterator[internal_pb2.PresenceLinkRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[internal_pb2.PresenceLinkResponse]:
        async for request in request_iterator:
            if request.WhichOneof("event") == "heartbeat":
                yield internal_pb2.PresenceLinkResponse(
                    seq=request.seq, heartbeat=common_pb2.Heartbeat(sent_at=timestamp(self.core.clock.now()))
                )
                continue
            with _link_span(self.core, "PresenceLink", request.WhichOneof("event"), request.trace_context):
                response = await self._presence_event(request)
            yield response

    async def _presence_event(
        self, request: internal_pb2.PresenceLinkRequest
    ) -> internal_pb2.PresenceLinkResponse:
        core, seq = self.core, request.seq
        try:
            which = request.WhichOneof("event")
            if which == "device_online":
                device = request.device_online.device
                check_identity(device, "device", device=True)
                await core.tell_device(device.eid, device.device_id, {"t": "flush"})
                connected = await core.connected(device.eid, device.device_id)
                return internal_pb2.PresenceLinkResponse(
                    seq=seq, ack=internal_pb2.PresenceLinkAck(device_connected=connected)
                )
            if which == "resume":
                resume = request.resume
                check_identity(resume.device, "device", device=True)
                problem = eid_problem(resume.peer_eid)
                if problem is not None:
                    raise invalid("INVALID_EID", f"peer_eid {problem}", field="peer_eid")
                if resume.after_offset < 0:
                    raise invalid("INVALID_OFFSET", "after_offset must not be negative", field="after_offset")
                await core.tell_device(
                    resume.device.eid,
                    resume.device.device_id,
                    {"t": "replay", "peer": resume.peer_eid, "after": resume.after_offset},
                )
                connected = await core.connected(resume.device.eid, resume.device.device_id)
                return internal_pb2.PresenceLinkResponse(
                    seq=seq, ack=internal_pb2.PresenceLinkAck(device_connected=connected)
                )
            if which == "block_change":
                change = request.block_change
                for eid, name in ((change.blocker_eid, "blocker_eid"), (change.blocked_eid, "blocked_eid")):
                    problem = eid_problem(eid)
                    if problem is not None:
                        raise invalid("INVALID_EID", f"{name} {problem}", field=name)
                await core.writer.submit(BlockOp(change.blocker_eid, change.blocked_eid, change.blocked))
                return internal_pb2.PresenceLinkResponse(seq=seq, ack=internal_pb2.PresenceLinkAck())
            raise invalid("FRAME_EMPTY", "the frame carries nothing (unknown or missing event)")
        except BimipError as err:
            return internal_pb2.PresenceLinkResponse(seq=seq, error=err.to_proto())

    async def LogLink(
        self,
        request_iterator: AsyncIterator[internal_pb2.LogLinkRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[internal_pb2.LogLinkResponse]:
        link = _LogLink(self.core)
        self.core.links.add(link)
        self.core.log_links.inc()
        reader = asyncio.ensure_future(link.read(request_iterator))
        try:
            while True:
                item = await link.out.get()
                if item is None:
                    return
                yield item
        finally:
            self.core.log_links.dec()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await link.close()


class _LogLink:
    """One LogLink stream: reads with credit-based flow control, appends, acks (SPEC S2, S5, S7)."""

    def __init__(self, core: Messaging) -> None:
        self.core = core
        self.out: asyncio.Queue[internal_pb2.LogLinkResponse | None] = asyncio.Queue(256)
        self.credits: dict[int, asyncio.Semaphore] = {}
        self.reads: dict[int, asyncio.Future[Any]] = {}
        self.tasks: set[asyncio.Future[Any]] = set()

    def cancel(self) -> list[asyncio.Future[Any]]:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        return tasks

    async def close(self) -> None:
        await asyncio.gather(*self.cancel(), return_exceptions=True)
        self.core.links.discard(self)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def read(self, requests: AsyncIterator[internal_pb2.LogLinkRequest]) -> None:
        try:
            async for request in requests:
                seq = request.seq
                which = request.WhichOneof("op")
                if which == "read":
                    self.credits[seq] = asyncio.Semaphore(max(1, request.read.initial_credit))
                    self.reads[seq] = self._spawn(self._guard(request, self._read_log(seq, request.read)))
                elif which == "credit":
                    semaphore = self.credits.get(seq)
                    if request.credit.cancel:
                        self.credits.pop(seq, None)
                        if (reading := self.reads.pop(seq, None)) is not None:
                            reading.cancel()
                    elif semaphore is None:
                        await self._error(
                            seq, invalid("UNKNOWN_READ", "no read is open with this seq", field="seq")
                        )
                    elif request.credit.pages < 1:
                        await self._error(
                            seq, invalid("INVALID_CREDIT", "credit grants at least one page", field="pages")
                        )
                    else:
                        for _ in range(request.credit.pages):
                            semaphore.release()
                elif which == "append":
                    self._spawn(self._guard(request, self._append(seq, request.append)))
                elif which == "ack":
                    self._spawn(self._guard(request, self._ack(seq, request.ack)))
                elif which == "list_devices":
                    self._spawn(self._guard(request, self._list(seq, request.list_devices)))
                elif which == "heartbeat":
                    await self.out.put(
                        internal_pb2.LogLinkResponse(
                            seq=seq, heartbeat=common_pb2.Heartbeat(sent_at=timestamp(self.core.clock.now()))
                        )
                    )
                else:
                    await self._error(
                        seq, invalid("FRAME_EMPTY", "the frame carries nothing (unknown or missing op)")
                    )
            if self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
        finally:
            await self.out.put(None)

    async def _error(self, seq: int, err: BimipError) -> None:
        await self.out.put(internal_pb2.LogLinkResponse(seq=seq, error=err.to_proto()))

    async def _guard(self, request: internal_pb2.LogLinkRequest, work: Awaitable[None]) -> None:
        """Run one request's work in a span of the requester's trace; a refusal is its answer."""
        try:
            with _link_span(self.core, "LogLink", request.WhichOneof("op"), request.trace_context):
                await work
        except BimipError as err:
            await self._error(request.seq, err)

    async def _read_log(self, seq: int, read: internal_pb2.ReadLog) -> None:
        core = self.core
        reader = read.reader
        try:
            problem = eid_problem(reader.eid)
            if problem is not None:
                raise invalid("INVALID_EID", f"reader.eid {problem}", field="reader.eid")
            if reader.device_id and device_id_problem(reader.device_id) is not None:
                raise invalid("INVALID_DEVICE_ID", "reader.device_id is malformed", field="reader.device_id")
            if read.after_offset < 0 or read.max_entries < 0:
                raise invalid("INVALID_OFFSET", "after_offset and max_entries must not be negative")
            page_size = read.page_size or 100
            if not 1 <= page_size <= MAX_PAGE_SIZE:
                raise invalid("INVALID_PAGE_SIZE", f"page_size is 1..{MAX_PAGE_SIZE}", field="page_size")
            if read.peer_eid and eid_problem(read.peer_eid) is not None:
                raise invalid("INVALID_EID", "peer_eid is malformed", field="peer_eid")
            head, first = await core.log_bounds(reader.eid)
            if read.after_offset > head or read.after_offset < first - 1:
                raise BimipError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "SNAPSHOT_REQUIRED",
                    "the version is beyond the head or was compacted; take a snapshot",
                    {"head": str(head), "first_offset": str(first)},
                )
            semaphore = self.credits[seq]
            position, sent = read.after_offset, 0
            everything = read.include_all or not reader.device_id
            while True:
                await semaphore.acquire()
                rows = await core.hub.read_log(
                    reader.eid, position, page_size, peer_eid=read.peer_eid or None, upto=head
                )
                page = internal_pb2.LogPage(head=head, first_offset=first)
                for r in rows:
                    if read.max_entries and sent >= read.max_entries:
                        break
                    position = r.offset
                    if everything or r.visible_to(reader.eid, reader.device_id):
                        page.entries.add().MergeFromString(r.body)  # parsed in place: no copy
                        sent += 1
                done = (
                    len(rows) < page_size
                    or position >= head
                    or bool(read.max_entries and sent >= read.max_entries)
                )
                page.next_after = position
                page.more = not done
                await self.out.put(internal_pb2.LogLinkResponse(seq=seq, page=page))
                if done:
                    return
        finally:
            self.credits.pop(seq, None)
            self.reads.pop(seq, None)

    async def _append(self, seq: int, append: internal_pb2.AppendMessages) -> None:
        core = self.core
        device = append.device
        check_identity(device, "device", device=True)
        if len(append.messages) > MAX_APPEND_BATCH:
            raise invalid(
                "BATCH_TOO_LARGE",
                f"at most {MAX_APPEND_BATCH} messages per append",
                limit=str(MAX_APPEND_BATCH),
            )
        await core.device_seen(device.eid, device.device_id)
        principal = Principal("client", device.eid, device.device_id, "", 0)

        async def one(message: common_pb2.Message) -> internal_pb2.AppendResult:
            try:
                return internal_pb2.AppendResult(
                    client_id=message.client_id, ack=await core.send(principal, message, None, via="sync")
                )
            except BimipError as err:
                return internal_pb2.AppendResult(client_id=message.client_id, error=err.to_proto())

        # Queued in the given order, so offsets follow it (S5: local-sequence order).
        results = await asyncio.gather(*(one(m) for m in append.messages))
        head = await core.hub.head(device.eid)
        await self.out.put(
            internal_pb2.LogLinkResponse(
                seq=seq, appended=internal_pb2.AppendResults(results=results, head=head)
            )
        )

    async def _ack(self, seq: int, ack: internal_pb2.AckLog) -> None:
        core = self.core
        check_identity(ack.device, "device", device=True)
        if ack.offset < 0:
            raise invalid("INVALID_OFFSET", "offset must not be negative", field="offset")
        head = await core.hub.head(ack.device.eid)
        if ack.offset > head:
            raise _out_of_range("ACK_BEYOND_HEAD", "the offset is beyond the end of the log", head=str(head))
        await core.device_seen(ack.device.eid, ack.device.device_id)
        op = AckOp(ack.device.eid, ack.device.device_id, ack.offset, announce=True)
        cursor = await core.writer.submit(op)
        core.count_ack("sync", op.moved, cursor, head)
        local = core.hub.local(ack.device.eid, ack.device.device_id)
        if local is not None:
            local.cursor_moved(cursor)
        await self.out.put(
            internal_pb2.LogLinkResponse(seq=seq, cursor=messaging_pb2.CursorUpdate(cursor=cursor))
        )

    async def _list(self, seq: int, request: internal_pb2.ListDevices) -> None:
        problem = eid_problem(request.eid)
        if problem is not None:
            raise invalid("INVALID_EID", f"eid {problem}", field="eid")
        devices = await self.core.device_statuses(request.eid)
        await self.out.put(internal_pb2.LogLinkResponse(seq=seq, devices=devices))

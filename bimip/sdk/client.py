"""The Python client SDK: one `Client` per device.

    async with Client(token, store="alice-laptop.db") as client:   # services on localhost
        sent = await client.send("bob@example.com", b"hi")        # returns at SENT
        async for event in client.events():                          # acked after each handler
            ...

What it guarantees:
- A message is first written to a durable outbox (SQLite), then sent on the messaging stream. The
  client id is generated once and reused on every retry, so retries never duplicate (SPEC M3).
  Messages the server has not acknowledged when the connection drops, or written while offline,
  go out through the sync hello when the connection returns, in the order they were written (S5).
- Every entry of the user's log reaches `events()` once: entries at or below the highest offset
  already handed to the application are dropped (redeliveries, replays after a reconnect). After
  the application asks for the next event, the previous one counts as processed: the SDK acks it
  (cumulatively), keeps it in the local copy of the log and stores the processed offset durably;
  reconnects resume from it. If the server's log no longer covers that offset, the device starts
  again from a snapshot (`SnapshotLoaded`).
- The awareness stream is open while the client runs, so the device is ONLINE; presence,
  activity, intent, visibility and subscription changes arrive as events.
- Tracing (OpenTelemetry, SPEC X6): a PRODUCER span per send whose context rides in the send
  frame, a CONSUMER span per delivery in the delivery's trace, and the ack carries it back, so
  one trace runs from the sender's send to the recipient's ack and the receipt back. Pass
  `tracer_provider`, or the global one is used (a no-op unless the application set one up).
- Each stream reconnects on its own with exponential backoff and jitter, and reports
  `ConnectionChanged` events. Refusals raise `BimipClientError` with the server's status and
  reason; no raw gRPC error reaches the application.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.awareness.v1 import awareness_pb2_grpc
from bimip.common.v1 import common_pb2
from bimip.core.errors import reason_of
from bimip.core.ranges import RANGE_SIZE, RangeHasher
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from bimip.sdk.awareness import AwarenessSession
from bimip.sdk.errors import BimipClientError
from bimip.sdk.events import (
    ConnectionChanged,
    EntryEvent,
    Event,
    PresenceChanged,
    SnapshotLoaded,
    entry_event,
)
from bimip.sdk.frames import ANSWER_TIMEOUT_S, ConnectionLost, Frames, Supervisor, deliveries_in
from bimip.sdk.store import LocalStore, Pending
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc

log = logging.getLogger(__name__)

MESSAGING, AWARENESS, SYNC = "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"
_CLOSED = object()
STATS_OFFSETS = 1024
MAX_BATCH = 64
"""OpenRequest.max_batch: the most log entries the client takes in one frame (the server may bound
it lower; OpenResponse.max_batch says what it granted)."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class SendResult:
    """The server's acknowledgement (SENT) of a message."""

    client_id: str
    signal_id: str
    offset: int
    duplicate: bool  # the server had it already (a retry)


@dataclass(frozen=True)
class SyncResult:
    """What one hello exchange did: the server's head, how many outbox messages it took, and how
    many log entries it sent (those the application had not seen arrive as events)."""

    head: int
    uploaded: int
    received: int


@dataclass
class Stats:
    """What the SDK saw on the wire, for diagnostics: log entries delivered to it (redeliveries
    included), those it dropped because the application already had them, and the frames that
    carried several entries at once (`deliveries` frames, see MAX_BATCH)."""

    deliveries: int = 0
    dropped: int = 0
    batches: int = 0
    by_offset: dict[int, int] = field(default_factory=dict)  # deliveries per offset, the latest 1,024

    def delivered(self, offset: int) -> None:
        self.deliveries += 1
        self.by_offset[offset] = self.by_offset.get(offset, 0) + 1
        if len(self.by_offset) > STATS_OFFSETS:  # a long-running client must not grow without end
            del self.by_offset[next(iter(self.by_offset))]  # the first delivered of those kept


def token_identity(token: str) -> tuple[str, str]:
    """(eid, device id) named by a client token (read, not verified: the server verifies)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["sub"]), str(claims["device"])
    except (IndexError, ValueError, KeyError) as exc:
        raise ValueError("the token is not a BIMIP client token (a JWT with `sub` and `device`)") from exc


class Client:
    """One device of one user. Use as `async with Client(...) as client:`.

    Args:
        token: the device's bearer token (it names the user and the device).
        store: the SQLite file of the device's durable state (outbox, position, log copy).
        address: one address serving all three services (a gateway); overrides the three below.
        messaging, awareness, sync: each service's host:port (`awareness=None`: no awareness).
        awareness_stream: keep the awareness stream open while the client runs, so the device
            shows ONLINE and receives presence and activity; False still allows the awareness
            calls (intent, visibility, subscriptions).
        auto_ack: ack each entry once the application asks for the next event; with False, call
            `processed(offset)` yourself.
        backoff: the first and the longest wait between reconnection attempts, in seconds.
        tracer_provider: where the SDK's spans go (default: OpenTelemetry's global provider).
    """

    def __init__(
        self,
        token: str,
        *,
        store: str | Path,
        address: str | None = None,
        messaging: str = MESSAGING,
        awareness: str | None = AWARENESS,
        sync: str = SYNC,
        awareness_stream: bool = True,
        auto_ack: bool = True,
        backoff: tuple[float, float] = (0.1, 5.0),
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.eid, self.device_id = token_identity(token)
        self._metadata = (("authorization", f"Bearer {token}"),)
        if address is not None:
            messaging = sync = address
            awareness = address if awareness is not None else None
        self._addresses = {"messaging": messaging, "sync": sync}
        if awareness is not None:
            self._addresses["awareness"] = awareness
        self._awareness_stream = awareness_stream and awareness is not None
        self._store_path = store
        self._auto_ack = auto_ack
        self._backoff = backoff
        self._store: LocalStore | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._frames = Frames()  # the messaging stream
        self._awareness: AwarenessSession | None = None
        self._sends: dict[str, asyncio.Future[SendResult]] = {}
        self._messages: dict[str, common_pb2.Message] = {}  # outbox messages by client id
        self._send_seqs: dict[int, str] = {}
        self._written: set[str] = set()  # client ids written on the current stream
        self._local = itertools.count(1)
        self._ack_wanted = asyncio.Event()
        self._emitted = 0  # the highest offset handed to the application
        self._processed = 0  # the highest offset the application has processed
        self._acked = 0
        self._unstored: list[common_pb2.Entry] = []  # emitted, not yet in the log copy
        self._supervisors: dict[str, Supervisor] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = Stats()
        self._provider = tracer_provider or trace.get_tracer_provider()
        self._tracer = self._provider.get_tracer("bimip.sdk")
        self._send_spans: dict[str, tuple[Span, dict[str, str]]] = {}  # client id -> span, carrier
        self._delivery_traces: dict[int, dict[str, str]] = {}  # offset -> carrier, until acked

    # --- lifecycle ---

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def state(self) -> str:
        """The messaging stream's state: `connected`, `reconnecting` or `closed`."""
        supervisor = self._supervisors.get("messaging")
        return supervisor.state if supervisor is not None else "closed"

    @property
    def awareness_state(self) -> str:
        """The awareness stream's state: `connected`, `reconnecting` or `closed`."""
        supervisor = self._supervisors.get("awareness")
        return supervisor.state if supervisor is not None else "closed"

    async def start(self) -> None:
        """Open the local store and connect. Returns after the first attempt of each stream:
        connected, or reconnecting in the background. Raises BimipClientError if the server
        refuses the token."""
        self._store = LocalStore(self._store_path)
        self._processed = self._emitted = self._acked = await self._store.processed()
        for name, address in self._addresses.items():
            self._channels[name] = grpc.aio.insecure_channel(address)
        self._supervisors["messaging"] = Supervisor(
            "messaging", self._messaging_session, self._report, self._backoff, self._messaging_down
        )
        if self._awareness_stream:
            self._awareness = AwarenessSession(self._channels["awareness"], self._metadata, self._emit)
            self._supervisors["awareness"] = Supervisor(
                "awareness", self._awareness.session, self._report, self._backoff, self._awareness.frames.lost
            )
        for name, supervisor in self._supervisors.items():
            self._tasks.append(
                asyncio.create_task(supervisor.run(), name=f"bimip-sdk-{name}-{self.device_id}")
            )
        for supervisor in self._supervisors.values():
            await supervisor.attempted.wait()
            if supervisor.fatal is not None:
                await self.close()
                raise supervisor.fatal

    async def close(self) -> None:
        """Close the streams and the store. Messages not yet SENT stay in the outbox."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        closing = BimipClientError(
            grpc.StatusCode.CANCELLED, "CLIENT_CLOSED", "the client closed; the message stays in the outbox"
        )
        self._frames.lost(closing)
        if self._awareness is not None:
            self._awareness.frames.lost(closing)
        for future in self._sends.values():
            if not future.done():
                future.set_exception(closing)
                future.exception()  # its send may have been cancelled: not an unretrieved error
        for client_id in list(self._send_spans):
            self._end_send_span(client_id, error="CLIENT_CLOSED")
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._events.put_nowait(_CLOSED)

    # --- the application's side ---

    async def events(self) -> AsyncIterator[Event]:
        """Every event once, in log order. With auto_ack, an entry counts as processed when the
        application asks for the next event (its handler returned)."""
        while True:
            event = await self._events.get()
            if event is _CLOSED:
                return
            yield event
            if self._auto_ack and isinstance(event, EntryEvent):
                self.processed(event.offset)

    def processed(self, offset: int) -> None:
        """Mark everything up to `offset` processed (called for you with auto_ack)."""
        if offset > self._processed:
            self._processed = offset
            self._ack_wanted.set()

    @property
    def position(self) -> int:
        """The offset up to which the application has processed the log."""
        return self._processed

    async def send(
        self,
        to: str,
        payload: bytes = b"",
        *,
        client_id: str | None = None,
        device: str = "",
        type: int = common_pb2.MESSAGE_TYPE_CHAT,
    ) -> SendResult:
        """Send a message to user `to` (all their devices, or only `device`) and return at SENT.
        Offline, it waits in the durable outbox and goes out when the connection returns. Raises
        BimipClientError if the server refuses it. Giving the `client_id` of an earlier send
        retries it: the server answers with the first send's offset (`duplicate`)."""
        assert self._store is not None, "start the client first"
        client_id = client_id or uuid.uuid4().hex
        message = common_pb2.Message(
            client_id=client_id,
            recipient=common_pb2.Identity(eid=to, device_id=device),
            type=type,  # type: ignore[arg-type]
            payload=payload,
        )
        message.client_time.FromNanoseconds(time.time_ns())
        future = self._sends.get(client_id)
        if future is None:
            future = self._sends[client_id] = asyncio.get_running_loop().create_future()
            local_seq = f"{time.time_ns():020d}:{next(self._local):08d}:{self.device_id}"
            self._messages[client_id] = message
            self._start_send_span(client_id, to)
            await self._store.add(Pending(client_id, local_seq, message))
        if self._frames.open:
            await self._write_send(client_id, message)
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._sends.pop(client_id, None)

    async def mark_read(self, signal_id: str) -> messaging_pb2.MarkResult:
        """Mark one received message READ (SPEC M8)."""
        return await self._mark(common_pb2.DELIVERY_STATUS_READ, signal_id=signal_id)

    async def mark_read_until(self, peer: str, offset: int) -> messaging_pb2.MarkResult:
        """Mark READ every message from `peer` up to `offset` of this user's log."""
        peer_range = messaging_pb2.PeerRange(peer_eid=peer, up_to_offset=offset)
        return await self._mark(common_pb2.DELIVERY_STATUS_READ, peer_range=peer_range)

    async def mark_played(self, signal_id: str) -> messaging_pb2.MarkResult:
        """Mark a received voice or video message PLAYED."""
        return await self._mark(common_pb2.DELIVERY_STATUS_PLAYED, signal_id=signal_id)

    async def edit(self, signal_id: str, payload: bytes) -> messaging_pb2.CommandResult:
        """Replace the payload of a message this user sent."""
        return await self._command(signal_id, common_pb2.COMMAND_KIND_EDIT, payload=payload)

    async def delete(self, signal_id: str, *, for_everyone: bool = True) -> messaging_pb2.CommandResult:
        """Delete a message for everyone (the sender's own messages) or only for this user."""
        kind = (
            common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE
            if for_everyone
            else common_pb2.COMMAND_KIND_DELETE_FOR_ME
        )
        return await self._command(signal_id, kind)

    async def message_status(self, signal_id: str) -> messaging_pb2.GetMessageStatusResponse:
        """The message's aggregate status and its per-device detail."""
        stub = messaging_pb2_grpc.MessagingServiceStub(self._channel("messaging"))
        return await self._unary(
            stub.GetMessageStatus(messaging_pb2.GetMessageStatusRequest(signal_id=signal_id), **self._call())
        )

    async def history(self, peer: str, limit: int = 50) -> list[common_pb2.Entry]:
        """The last `limit` entries of the conversation with `peer` in the local copy of the log,
        oldest first: messages either way (this device's own included), receipts and commands.
        `sync()` first brings the copy up to the server's head."""
        assert self._store is not None, "start the client first"
        return await self._store.history(peer, limit)

    # --- awareness ---

    @property
    def presences(self) -> dict[str, PresenceChanged]:
        """The latest presence of every user this user is subscribed to."""
        return dict(self._awareness.presences) if self._awareness is not None else {}

    @property
    def intent(self) -> aw.Status.ValueType:
        """This user's intent as last known (ONLINE when none is set)."""
        return self._awareness.intent if self._awareness is not None else aw.STATUS_ONLINE

    @property
    def hidden(self) -> bool:
        """Whether this user's presence is hidden, as last known."""
        return self._awareness.hidden if self._awareness is not None else False

    async def set_intent(self, intent: aw.Status.ValueType) -> None:
        """Set AWAY, BUSY or DND for the user (all devices); ONLINE clears it."""
        await self._unary(self._aw().SetIntent(aw.SetIntentRequest(intent=intent), **self._call()))

    async def set_visibility(self, hidden: bool) -> None:
        """Hide the user's presence (subscribers see OFFLINE without last seen), or show it."""
        await self._unary(self._aw().SetVisibility(aw.SetVisibilityRequest(hidden=hidden), **self._call()))

    async def typing(self, peer: str) -> None:
        """Tell `peer` this user is typing; it expires by itself unless repeated."""
        await self._activity(aw.STATUS_TYPING, peer)

    async def recording(self, peer: str) -> None:
        """Tell `peer` this user is recording a voice message."""
        await self._activity(aw.STATUS_RECORDING, peer)

    async def stop_activity(self, peer: str) -> None:
        """Stop typing or recording toward `peer`."""
        await self._activity(aw.STATUS_PAUSED, peer)

    async def subscribe(self, target: str) -> aw.Subscription:
        """Ask to see `target`'s presence; it shows once `target` approves."""
        stub = self._aw()
        answer: aw.RequestSubscriptionResponse = await self._unary(
            stub.RequestSubscription(aw.RequestSubscriptionRequest(target_eid=target), **self._call())
        )
        return answer.subscription

    async def approve(self, subscriber: str) -> aw.Subscription:
        """Let `subscriber` see this user's presence."""
        answer: aw.ApproveSubscriptionResponse = await self._unary(
            self._aw().ApproveSubscription(
                aw.ApproveSubscriptionRequest(subscriber_eid=subscriber), **self._call()
            )
        )
        return answer.subscription

    async def deny(self, subscriber: str) -> aw.Subscription:
        """Refuse `subscriber`'s request, or end its subscription."""
        answer: aw.DenySubscriptionResponse = await self._unary(
            self._aw().DenySubscription(aw.DenySubscriptionRequest(subscriber_eid=subscriber), **self._call())
        )
        return answer.subscription

    async def unsubscribe(self, target: str) -> None:
        """Stop seeing `target`'s presence (or withdraw the request)."""
        await self._unary(self._aw().Unsubscribe(aw.UnsubscribeRequest(target_eid=target), **self._call()))

    async def block(self, eid: str) -> None:
        """Block `eid`: subscriptions both ways end, and their messages are refused."""
        await self._unary(self._aw().Block(aw.BlockRequest(eid=eid), **self._call()))

    async def unblock(self, eid: str) -> None:
        """Lift a block; subscriptions do not come back by themselves."""
        await self._unary(self._aw().Unblock(aw.UnblockRequest(eid=eid), **self._call()))

    async def subscriptions(self) -> aw.ListSubscriptionsResponse:
        """Whom this user is subscribed to, who is subscribed to this user, whom it blocks."""
        return await self._unary(self._aw().ListSubscriptions(aw.ListSubscriptionsRequest(), **self._call()))

    # --- sync ---

    async def sync(self) -> SyncResult:
        """Explicit sync: upload the outbox and fetch every entry this device has not seen, now
        (they arrive as events, once)."""
        assert self._store is not None, "start the client first"
        return await self._hello(await self._store.outbox())

    async def snapshot(self, version: int = 0) -> sync_pb2.Snapshot:
        """The user's snapshot at `version` (0: the latest checkpoint or the head): every
        conversation's peer, last entry, unread count and last status."""
        stub = sync_pb2_grpc.SyncServiceStub(self._channel("sync"))
        answer = await self._unary(
            stub.GetSnapshot(sync_pb2.GetSnapshotRequest(version=version), **self._call())
        )
        return answer.snapshot

    async def devices(self) -> sync_pb2.ListDevicesResponse:
        """The user's devices with their cursors, last-seen times and last snapshots."""
        stub = sync_pb2_grpc.SyncServiceStub(self._channel("sync"))
        return await self._unary(stub.ListDevices(sync_pb2.ListDevicesRequest(), **self._call()))

    async def resume_from_snapshot(self) -> int:
        """Check the local copy of the log against the server's range checksums up to the
        processed offset (SPEC S4) and replace the ranges that differ. Returns how many ranges
        were repaired. If the server's log no longer covers the position, the device starts
        again from a snapshot instead (`SnapshotLoaded`)."""
        assert self._store is not None, "start the client first"
        version = self._processed
        hasher = RangeHasher(version)
        for offset, body in await self._store.serialized(version):
            hasher.add_serialized(offset, body)
        digests = hasher.digests()
        request = sync_pb2.ResumeSnapshotRequest(
            version=version,
            algorithm=sync_pb2.CHECKSUM_ALGORITHM_SHA256_RANGE_1024,
            ranges=[sync_pb2.RangeChecksum(range_index=k, sha256=d) for k, d in digests.items()],
        )
        stub = sync_pb2_grpc.SyncServiceStub(self._channel("sync"))
        try:
            answer = await self._unary(stub.ResumeSnapshot(request, **self._call()))
        except BimipClientError as err:
            if err.reason != "SNAPSHOT_REQUIRED":
                raise
            await self._reset_to_snapshot()
            return 0
        for repair in answer.repairs:
            first = repair.range_index * RANGE_SIZE + 1
            await self._store.replace_range(first, first + RANGE_SIZE - 1, list(repair.entries))
        return len(answer.repairs)

    # --- calls ---

    def _channel(self, name: str) -> grpc.aio.Channel:
        channel = self._channels.get(name)
        if channel is None:
            raise BimipClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "NOT_STARTED",
                f"no {name} connection: start the client first",
            )
        return channel

    def _aw(self) -> Any:
        return awareness_pb2_grpc.AwarenessServiceStub(self._channel("awareness"))

    def _call(self) -> dict[str, Any]:
        return {"metadata": self._traced_metadata(), "timeout": ANSWER_TIMEOUT_S}

    def _traced_metadata(self, context: Any = None) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the token, and the trace context of the current (or given) span."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=context)
        return self._metadata + tuple(carrier.items())

    @staticmethod
    async def _unary(call: Awaitable[_T]) -> _T:
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise BimipClientError.from_rpc(err) from None

    async def _activity(self, status: aw.Status.ValueType, peer: str) -> None:
        if self._awareness is None:
            raise BimipClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "NO_AWARENESS_STREAM",
                "activity needs the awareness stream (the client was made without it)",
            )
        await self._awareness.activity(status, peer)

    async def _mark(self, status: int, **target: Any) -> messaging_pb2.MarkResult:
        mark = messaging_pb2.MarkRequest(status=status, **target)  # type: ignore[arg-type]
        answer = await self._frames.ask(lambda seq: messaging_pb2.ConnectRequest(seq=seq, mark=mark))
        return answer.marked  # type: ignore[no-any-return]

    async def _command(self, signal_id: str, kind: int, **fields: Any) -> messaging_pb2.CommandResult:
        now = time.time_ns() // 1_000_000
        command = common_pb2.Command(
            signal_id=signal_id,
            kind=kind,  # type: ignore[arg-type]
            clock=common_pb2.HybridLogicalClock(wall_time_ms=now),
            **fields,
        )
        request = messaging_pb2.CommandRequest(command=command)
        answer = await self._frames.ask(lambda seq: messaging_pb2.ConnectRequest(seq=seq, command=request))
        return answer.command_result  # type: ignore[no-any-return]

    async def _write_send(self, client_id: str, message: common_pb2.Message) -> None:
        if client_id in self._written:
            return
        self._written.add(client_id)
        seq = self._frames.next_seq()
        self._send_seqs[seq] = client_id
        traced = self._send_spans.get(client_id)
        request = messaging_pb2.ConnectRequest(
            seq=seq,
            send=messaging_pb2.SendRequest(message=message),
            trace_context=traced[1] if traced else None,
        )
        # A lost connection leaves the message in the outbox: the next hello sends it.
        with contextlib.suppress(ConnectionLost):
            await self._frames.write(request)

    # --- tracing ---

    def _start_send_span(self, client_id: str, to: str) -> None:
        span = self._tracer.start_span(
            "send",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "bimip",
                "messaging.operation.type": "send",
                "bimip.user": self.eid,
                "bimip.device": self.device_id,
                "bimip.recipient": to,
            },
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        self._send_spans[client_id] = (span, carrier)

    def _end_send_span(self, client_id: str, result: SendResult | None = None, error: str = "") -> None:
        traced = self._send_spans.pop(client_id, None)
        if traced is None:
            return
        span = traced[0]
        if result is not None:
            span.set_attribute("bimip.offset", result.offset)
            span.set_attribute("bimip.signal_id", result.signal_id)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def _received(self, delivery: messaging_pb2.Delivery, carrier: Any) -> None:
        """A CONSUMER span in the delivery's trace; its context goes back with the entry's ack."""
        if not carrier:
            return
        entry = delivery.entry
        body = entry.WhichOneof("body")
        signal_id = getattr(entry, body).signal_id if body else ""
        span = self._tracer.start_span(
            "receive",
            context=propagate.extract(dict(carrier)),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "bimip",
                "messaging.operation.type": "receive",
                "bimip.user": self.eid,
                "bimip.device": self.device_id,
                "bimip.offset": entry.offset,
                "bimip.signal_id": signal_id,
                "bimip.redelivery": delivery.redelivery,
            },
        )
        span.end()
        back: dict[str, str] = {}
        propagate.inject(back, context=trace.set_span_in_context(span))
        self._delivery_traces[entry.offset] = back

    # --- the connections ---

    def _emit(self, event: Event) -> None:
        self._events.put_nowait(event)

    def _report(self, service: str, state: str, error: str) -> None:
        self._emit(ConnectionChanged(state, error, service))  # type: ignore[arg-type]

    def _messaging_down(self) -> None:
        self._frames.lost()
        self._send_seqs.clear()

    async def _messaging_session(self, supervisor: Supervisor) -> None:
        assert self._store is not None
        outbox = await self._store.outbox()
        if outbox:
            await self._hello(outbox)
        stub = messaging_pb2_grpc.MessagingServiceStub(self._channels["messaging"])
        call: Any = stub.Connect(metadata=self._metadata)
        try:
            await call.write(
                messaging_pb2.ConnectRequest(
                    seq=0,
                    open=messaging_pb2.OpenRequest(processed_offset=self._processed, max_batch=MAX_BATCH),
                )
            )
            try:
                async with asyncio.timeout(ANSWER_TIMEOUT_S):
                    first = await call.read()
            except grpc.aio.AioRpcError as err:
                if reason_of(err) != "ACK_BEYOND_HEAD":
                    raise
                await self._reset_to_snapshot()  # the server's log ends before our position
                raise ConnectionLost(
                    "the position was beyond the server's log; reset to a snapshot"
                ) from None
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
                raise ConnectionLost("the server did not open the stream")
            self._acked = max(self._acked, min(self._processed, first.opened.head))
            self._frames.call = call
            self._written = set()
            supervisor.up()
            helpers = [
                asyncio.create_task(self._acks()),
                asyncio.create_task(self._heartbeats(first.opened.heartbeat_interval_ms / 1000)),
                asyncio.create_task(self._flush_outbox()),
            ]
            try:
                while (frame := await call.read()) is not grpc.aio.EOF:
                    await self._frame(frame)
            finally:
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
        finally:
            call.cancel()

    async def _flush_outbox(self) -> None:
        """Messages written while the connection was being made go out on the new stream."""
        assert self._store is not None
        for pending in await self._store.outbox():
            self._messages.setdefault(pending.client_id, pending.message)
            await self._write_send(pending.client_id, pending.message)

    async def _hello(self, outbox: list[Pending]) -> SyncResult:
        """The sync hello: upload the outbox, receive what this device has not seen (as
        events). If the server's log no longer covers the position, reset to a snapshot first."""
        try:
            return await self._hello_once(outbox)
        except grpc.aio.AioRpcError as err:
            if reason_of(err) != "SNAPSHOT_REQUIRED":
                raise BimipClientError.from_rpc(err) from None
        await self._reset_to_snapshot()
        try:
            return await self._hello_once(outbox)
        except grpc.aio.AioRpcError as err:
            raise BimipClientError.from_rpc(err) from None

    async def _hello_once(self, outbox: list[Pending]) -> SyncResult:
        for pending in outbox:
            self._messages.setdefault(pending.client_id, pending.message)
        stub = sync_pb2_grpc.SyncServiceStub(self._channel("sync"))
        span = self._tracer.start_span(
            "bimip.sync.v1.SyncService/Hello",
            kind=SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "bimip.sync.v1.SyncService",
                "rpc.method": "Hello",
                "bimip.user": self.eid,
                "bimip.device": self.device_id,
                "bimip.uploads": len(outbox),
            },
        )
        metadata = self._traced_metadata(trace.set_span_in_context(span))
        call: Any = stub.Hello(metadata=metadata, timeout=120)
        uploads = [sync_pb2.OfflineMessage(message=p.message, local_seq=p.local_seq) for p in outbox]
        opening = sync_pb2.HelloOpen(last_version=self._emitted, messages=uploads)
        head = uploaded = received = 0
        try:
            await call.write(sync_pb2.HelloRequest(seq=1, open=opening))
            while (frame := await call.read()) is not grpc.aio.EOF:
                kind = frame.WhichOneof("frame")
                if kind == "appended":
                    appended = frame.appended
                    if appended.HasField("error"):
                        await self._refused(appended.client_id, BimipClientError.from_frame(appended.error))
                    else:
                        await self._sent(
                            SendResult(
                                appended.client_id, appended.signal_id, appended.offset, appended.duplicate
                            )
                        )
                elif kind == "page":
                    for entry in frame.page.entries:
                        self._deliver(entry)
                elif kind == "end":
                    head = frame.end.head
                    break
            await call.done_writing()
        except grpc.aio.AioRpcError as err:
            span.set_status(Status(StatusCode.ERROR, reason_of(err) or err.code().name))
            raise
        finally:
            call.cancel()
            span.end()
        return SyncResult(head, uploaded, received)

    async def _reset_to_snapshot(self) -> None:
        assert self._store is not None
        snapshot = await self.snapshot()
        await self._store.reset(snapshot.version)
        self._processed = self._emitted = self._acked = snapshot.version
        self._unstored = []
        log.warning(
            "bimip sdk: %s/%s starts again from snapshot %s", self.eid, self.device_id, snapshot.version
        )
        self._emit(SnapshotLoaded(snapshot))

    async def _sent(self, result: SendResult) -> None:
        assert self._store is not None
        self._written.discard(result.client_id)  # a later send with this id is a new attempt
        message = self._messages.pop(result.client_id, None)
        own = None
        if message is not None:
            own = common_pb2.Entry(
                offset=result.offset,
                peer_eid=message.recipient.eid,
                author=common_pb2.Identity(eid=self.eid, device_id=self.device_id),
                message=message,
            )
            own.message.signal_id = result.signal_id
            own.message.sender.CopyFrom(own.author)
        await self._store.sent(result.client_id, own)
        self._end_send_span(result.client_id, result)
        future = self._sends.get(result.client_id)
        if future is not None and not future.done():
            future.set_result(result)

    async def _refused(self, client_id: str, error: BimipClientError) -> None:
        assert self._store is not None
        self._written.discard(client_id)
        self._messages.pop(client_id, None)
        await self._store.sent(client_id, None)
        self._end_send_span(client_id, error=error.reason or error.code.name)
        future = self._sends.get(client_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _deliver(self, entry: common_pb2.Entry) -> None:
        self.stats.delivered(entry.offset)
        if entry.offset <= self._emitted:
            self.stats.dropped += 1
            return  # a redelivery or a replay of what the application already has
        self._emitted = entry.offset
        self._unstored.append(entry)
        event = entry_event(entry, self.eid)
        if event is not None:
            self._emit(event)
        else:
            self.processed(entry.offset)

    async def _frame(self, frame: messaging_pb2.ConnectResponse) -> None:
        kind = frame.WhichOneof("frame")
        if kind in ("delivery", "deliveries"):
            if kind == "deliveries":
                self.stats.batches += 1
            for delivery, carrier in deliveries_in(frame):  # in offset order, each as if alone
                if not delivery.replay:
                    self._received(delivery, carrier)
                    self._deliver(delivery.entry)
        elif kind == "sent":
            self._send_seqs.pop(frame.seq, None)
            sent = frame.sent
            await self._sent(SendResult(sent.client_id, sent.signal_id, sent.offset, sent.duplicate))
        elif kind == "error" and frame.seq in self._send_seqs:
            await self._refused(self._send_seqs.pop(frame.seq), BimipClientError.from_frame(frame.error))
        else:
            self._frames.answered(frame)

    async def _acks(self) -> None:
        """Cumulative acks of what the application processed, one in flight; the processed
        entries and the position are stored durably first."""
        assert self._store is not None
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            offset = self._processed
            done = [e for e in self._unstored if e.offset <= offset]
            await self._store.set_processed(offset, done)
            self._unstored = self._unstored[len(done) :]
            if offset > self._acked:
                carrier = self._delivery_traces.get(offset)
                for done_offset in [o for o in self._delivery_traces if o <= offset]:
                    del self._delivery_traces[done_offset]
                await self._frames.write(
                    messaging_pb2.ConnectRequest(
                        seq=self._frames.next_seq(),
                        ack=messaging_pb2.AckRequest(offset=offset),
                        trace_context=carrier,
                    )
                )
                self._acked = offset

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._frames.write(
                messaging_pb2.ConnectRequest(seq=self._frames.next_seq(), heartbeat=common_pb2.Heartbeat())
            )


__all__ = ["Client", "SendResult", "Stats", "SyncResult", "token_identity"]

"""The Python client SDK: one `Client` per device.

    async with Client(token, messaging="127.0.0.1:50051", sync="127.0.0.1:50053",
                      store="alice-laptop.db") as client:
        sent = await client.send("bob@example.com", b"hi")      # returns at SENT
        async for event in client.events():                        # acked after each handler
            ...

What it guarantees:
- A message is first written to a durable outbox (SQLite), then sent on the Connect stream. The
  client id is generated once and reused on every retry, so retries never duplicate (SPEC M3).
  Messages the server has not acknowledged when the connection drops, or written while offline,
  go out through the sync hello when the connection returns, in the order they were written (S5).
- Every entry of the user's log reaches `events()` once: entries at or below the highest offset
  already handed to the application are dropped (redeliveries, replays after a reconnect). After
  the application asks for the next event, the previous one counts as processed: the SDK acks it
  (cumulatively) and stores the processed offset durably, and reconnects resume from it.
- On a broken connection it reconnects with exponential backoff and jitter, and reports
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
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bimip.common.v1 import common_pb2
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from bimip.sdk.errors import BimipClientError
from bimip.sdk.events import ConnectionChanged, EntryEvent, Event, entry_event
from bimip.sdk.store import LocalStore, Pending
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 30.0
_CLOSED = object()


@dataclass(frozen=True)
class SendResult:
    """The server's acknowledgement (SENT) of a message."""

    client_id: str
    signal_id: str
    offset: int
    duplicate: bool  # the server had it already (a retry)


class _ConnectionLost(Exception):
    pass


def token_identity(token: str) -> tuple[str, str]:
    """(eid, device id) named by a client token (read, not verified: the server verifies)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["sub"]), str(claims["device"])
    except (IndexError, ValueError, KeyError) as exc:
        raise ValueError("the token is not a BIMIP client token (a JWT with `sub` and `device`)") from exc


class Client:
    """One device of one user. Use as `async with Client(...) as client:`."""

    def __init__(
        self,
        token: str,
        *,
        messaging: str,
        sync: str,
        store: str | Path,
        auto_ack: bool = True,
        backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self.eid, self.device_id = token_identity(token)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._addresses = {"messaging": messaging, "sync": sync}
        self._store_path = store
        self._auto_ack = auto_ack
        self._backoff = backoff
        self._store: LocalStore | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._sends: dict[str, asyncio.Future[SendResult]] = {}
        self._by_seq: dict[int, asyncio.Future[messaging_pb2.ConnectResponse]] = {}
        self._send_seqs: dict[int, str] = {}
        self._written: set[str] = set()  # client ids written on the current stream
        self._seq = itertools.count(1)
        self._local = itertools.count(1)
        self._call: Any = None
        self._online = asyncio.Event()
        self._ack_wanted = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._emitted = 0  # the highest offset handed to the application
        self._processed = 0  # the highest offset the application has processed
        self._acked = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._fatal: BimipClientError | None = None
        self.state = "closed"

    # --- lifecycle ---

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the local store and connect. Returns after the first attempt: connected, or
        reconnecting in the background. Raises BimipClientError if the server refuses the token."""
        self._store = LocalStore(self._store_path)
        self._processed = self._emitted = self._acked = await self._store.processed()
        for name, address in self._addresses.items():
            self._channels[name] = grpc.aio.insecure_channel(address)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"bimip-sdk-{self.device_id}")
        await self._first_attempt.wait()
        if self._fatal is not None:
            await self.close()
            raise self._fatal

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        closing = BimipClientError(
            grpc.StatusCode.CANCELLED, "CLIENT_CLOSED", "the client closed; the message stays in the outbox"
        )
        futures: list[asyncio.Future[Any]] = [*self._sends.values(), *self._by_seq.values()]
        for future in futures:
            if not future.done():
                future.set_exception(closing)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._store is not None:
            self._store.close()
            self._store = None
        self._set_state("closed")
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
            if self._auto_ack and not isinstance(event, ConnectionChanged):
                self.processed(event.offset)

    def processed(self, offset: int) -> None:
        """Mark everything up to `offset` processed (called for you with auto_ack)."""
        if offset > self._processed:
            self._processed = offset
            self._ack_wanted.set()

    async def send(
        self,
        to: str,
        payload: bytes = b"",
        *,
        client_id: str | None = None,
        device: str = "",
        type: int = common_pb2.MESSAGE_TYPE_CHAT,
    ) -> SendResult:
        """Send a message and return at SENT. Offline, it waits in the durable outbox and goes
        out when the connection returns. Raises BimipClientError if the server refuses it."""
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
            await self._store.add(Pending(client_id, local_seq, message))
        if self._online.is_set():
            await self._write_send(client_id, message)
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self._sends.pop(client_id, None)

    async def mark_read(self, signal_id: str) -> messaging_pb2.MarkResult:
        answer = await self._ask(
            mark=messaging_pb2.MarkRequest(status=common_pb2.DELIVERY_STATUS_READ, signal_id=signal_id)
        )
        return answer.marked

    async def mark_played(self, signal_id: str) -> messaging_pb2.MarkResult:
        answer = await self._ask(
            mark=messaging_pb2.MarkRequest(status=common_pb2.DELIVERY_STATUS_PLAYED, signal_id=signal_id)
        )
        return answer.marked

    async def edit(self, signal_id: str, payload: bytes) -> messaging_pb2.CommandResult:
        return await self._command(signal_id, common_pb2.COMMAND_KIND_EDIT, payload=payload)

    async def delete(self, signal_id: str, *, for_everyone: bool = True) -> messaging_pb2.CommandResult:
        kind = (
            common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE
            if for_everyone
            else common_pb2.COMMAND_KIND_DELETE_FOR_ME
        )
        return await self._command(signal_id, kind)

    async def message_status(self, signal_id: str) -> messaging_pb2.GetMessageStatusResponse:
        """The message's aggregate status and its per-device detail."""
        stub = messaging_pb2_grpc.MessagingServiceStub(self._channels["messaging"])
        try:
            return await stub.GetMessageStatus(
                messaging_pb2.GetMessageStatusRequest(signal_id=signal_id),
                metadata=self._metadata,
                timeout=ANSWER_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            raise BimipClientError.from_rpc(err) from None

    # --- requests on the stream ---

    async def _command(self, signal_id: str, kind: int, **fields: Any) -> messaging_pb2.CommandResult:
        now = time.time_ns() // 1_000_000
        command = common_pb2.Command(
            signal_id=signal_id,
            kind=kind,  # type: ignore[arg-type]
            clock=common_pb2.HybridLogicalClock(wall_time_ms=now),
            **fields,
        )
        answer = await self._ask(command=messaging_pb2.CommandRequest(command=command))
        return answer.command_result

    async def _ask(self, **frame: Any) -> messaging_pb2.ConnectResponse:
        if not self._online.is_set():
            raise BimipClientError(
                grpc.StatusCode.UNAVAILABLE, "OFFLINE", "not connected; try again when connected"
            )
        seq = next(self._seq)
        future = self._by_seq[seq] = asyncio.get_running_loop().create_future()
        try:
            await self._write(messaging_pb2.ConnectRequest(seq=seq, **frame))
            answer = await asyncio.wait_for(future, ANSWER_TIMEOUT_S)
        except (_ConnectionLost, TimeoutError):
            raise BimipClientError(
                grpc.StatusCode.UNAVAILABLE, "OFFLINE", "the connection was lost; try again"
            ) from None
        finally:
            self._by_seq.pop(seq, None)
        if answer.WhichOneof("frame") == "error":
            raise BimipClientError.from_frame(answer.error)
        result: messaging_pb2.ConnectResponse = answer
        return result

    async def _write(self, request: messaging_pb2.ConnectRequest) -> None:
        call = self._call
        if call is None:
            raise _ConnectionLost()
        try:
            async with self._write_lock:
                await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            raise _ConnectionLost() from exc

    async def _write_send(self, client_id: str, message: common_pb2.Message) -> None:
        if client_id in self._written:
            return
        self._written.add(client_id)
        seq = next(self._seq)
        self._send_seqs[seq] = client_id
        # A lost connection leaves the message in the outbox: the next hello sends it.
        with contextlib.suppress(_ConnectionLost):
            await self._write(
                messaging_pb2.ConnectRequest(seq=seq, send=messaging_pb2.SendRequest(message=message))
            )

    # --- the connection ---

    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.state = state
            if state != "closed":
                self._events.put_nowait(ConnectionChanged(state, error))  # type: ignore[arg-type]

    async def _supervise(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
                error = "the server ended the stream"
            except grpc.aio.AioRpcError as err:
                failure = BimipClientError.from_rpc(err)
                if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self._fatal = failure
                    self._first_attempt.set()
                    return
                error = str(failure)
            except (_ConnectionLost, BimipClientError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            finally:
                self._online.clear()
                self._call = None
                lost = _ConnectionLost()
                for future in self._by_seq.values():
                    if not future.done():
                        future.set_exception(lost)
            self._first_attempt.set()
            self._set_state("reconnecting", error)
            failures += 1
            low, high = self._backoff
            await asyncio.sleep(min(high, low * 2 ** (failures - 1)) * random.uniform(0.5, 1.5))
            if self._online.is_set():
                failures = 0

    async def _session(self) -> None:
        assert self._store is not None
        outbox = await self._store.outbox()
        if outbox:
            await self._hello(outbox)
        stub = messaging_pb2_grpc.MessagingServiceStub(self._channels["messaging"])
        call: Any = stub.Connect(metadata=self._metadata)
        try:
            await call.write(
                messaging_pb2.ConnectRequest(
                    seq=0, open=messaging_pb2.OpenRequest(processed_offset=self._processed)
                )
            )
            first = await asyncio.wait_for(call.read(), ANSWER_TIMEOUT_S)
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "opened":
                raise _ConnectionLost("the server did not open the stream")
            self._acked = max(self._acked, min(self._processed, first.opened.head))
            self._call = call
            self._written = set()
            self._online.set()
            self._set_state("connected")
            self._first_attempt.set()
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
            await self._write_send(pending.client_id, pending.message)

    async def _hello(self, outbox: list[Pending]) -> None:
        """Upload the outbox through the sync hello; what it sends back arrives as events."""
        stub = sync_pb2_grpc.SyncServiceStub(self._channels["sync"])
        call: Any = stub.Hello(metadata=self._metadata, timeout=120)
        uploads = [sync_pb2.OfflineMessage(message=p.message, local_seq=p.local_seq) for p in outbox]
        opening = sync_pb2.HelloOpen(last_version=self._emitted, messages=uploads)
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
                break
        await call.done_writing()
        call.cancel()

    async def _sent(self, result: SendResult) -> None:
        assert self._store is not None
        self._written.discard(result.client_id)  # a later send with this id is a new attempt
        await self._store.remove(result.client_id)
        future = self._sends.get(result.client_id)
        if future is not None and not future.done():
            future.set_result(result)

    async def _refused(self, client_id: str, error: BimipClientError) -> None:
        assert self._store is not None
        self._written.discard(client_id)
        await self._store.remove(client_id)
        future = self._sends.get(client_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _deliver(self, entry: common_pb2.Entry) -> None:
        if entry.offset <= self._emitted:
            return  # a redelivery or a replay of what the application already has
        self._emitted = entry.offset
        event = entry_event(entry, self.eid)
        if event is not None:
            self._events.put_nowait(event)
        else:
            self.processed(entry.offset)

    async def _frame(self, frame: messaging_pb2.ConnectResponse) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "delivery":
            if not frame.delivery.replay:
                self._deliver(frame.delivery.entry)
        elif kind == "sent":
            self._send_seqs.pop(frame.seq, None)
            sent = frame.sent
            await self._sent(SendResult(sent.client_id, sent.signal_id, sent.offset, sent.duplicate))
        elif kind == "error" and frame.seq in self._send_seqs:
            await self._refused(self._send_seqs.pop(frame.seq), BimipClientError.from_frame(frame.error))
        elif (future := self._by_seq.get(frame.seq)) is not None and not future.done():
            future.set_result(frame)

    async def _acks(self) -> None:
        """Cumulative acks of what the application processed, one in flight; stored durably."""
        assert self._store is not None
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            offset = self._processed
            await self._store.set_processed(offset)
            if offset > self._acked:
                await self._write(
                    messaging_pb2.ConnectRequest(
                        seq=next(self._seq), ack=messaging_pb2.AckRequest(offset=offset)
                    )
                )
                self._acked = offset

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._write(
                messaging_pb2.ConnectRequest(seq=next(self._seq), heartbeat=common_pb2.Heartbeat())
            )


__all__ = ["Client", "EntryEvent", "SendResult", "token_identity"]

"""Clients of messaging's internal streams (SPEC X1, M11, S7): PresenceLink for awareness, LogLink
for sync.

Each is one long-lived bidirectional stream per process, opened on first use with service
credentials. Every request gets a seq; messaging answers with that seq, once (an event, an append,
an ack) or page by page (a read, under credit-based flow control). Callers await their answers with
a deadline. If the stream breaks, everything waiting on it fails with UNAVAILABLE /
MESSAGING_UNAVAILABLE and the next request opens a new stream after a short backoff, so messaging
restarting costs a retry, not a stuck link.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any, Generic, TypeVar

import grpc
from opentelemetry import propagate

from bimip.common.v1 import common_pb2
from bimip.core.auth import ServiceCredentials
from bimip.core.clock import Clock
from bimip.core.errors import BimipError
from bimip.core.telemetry import Telemetry
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc, messaging_pb2

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = (0.05, 0.2, 1.0, 2.0)
# Client-side balancing: with an address that resolves to every messaging replica (a headless
# Service, `dns:///messaging-headless…:50051`), the channel keeps a connection to each and a new
# link stream (after a reconnect) goes to the next one, instead of gRPC's default pick_first.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

Req = TypeVar("Req", internal_pb2.PresenceLinkRequest, internal_pb2.LogLinkRequest)
Resp = TypeVar("Resp", internal_pb2.PresenceLinkResponse, internal_pb2.LogLinkResponse)


def unavailable(message: str) -> BimipError:
    return BimipError(grpc.StatusCode.UNAVAILABLE, "MESSAGING_UNAVAILABLE", message)


class _Link(Generic[Req, Resp]):
    """One multiplexed stream to messaging: `request` for one answer, `route` for several."""

    name = "link"

    def __init__(
        self, address: str, credentials: ServiceCredentials, telemetry: Telemetry, clock: Clock
    ) -> None:
        self._address = address
        self._credentials = credentials
        self._telemetry = telemetry
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._routes: dict[int, asyncio.Queue[Resp | BimipError]] = {}
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._failures = 0
        self._closed = False

    def _open(self, stub: Any) -> Any:
        raise NotImplementedError

    def _frame(self, seq: int, **op: Any) -> Req:
        raise NotImplementedError

    async def close(self) -> None:
        self._closed = True
        await self._drop(unavailable(f"the {self.name} is closing"))
        if self._channel is not None:
            await self._channel.close()

    async def request(self, **op: Any) -> Resp:
        """Send one request and return messaging's one answer.

        Raises BimipError: UNAVAILABLE / MESSAGING_UNAVAILABLE if messaging cannot be reached or
        does not answer in time, or the refusal messaging answered with.
        """
        seq, answers = await self.open_route(**op)
        try:
            return await self.next(answers)
        finally:
            self._routes.pop(seq, None)

    async def open_route(self, **op: Any) -> tuple[int, asyncio.Queue[Resp | BimipError]]:
        """Send a request whose answers arrive on the returned queue (close it with `end_route`)."""
        call = await self._connected()
        seq = next(self._seq)
        answers: asyncio.Queue[Resp | BimipError] = asyncio.Queue()
        self._routes[seq] = answers
        try:
            await self.write(call, seq, **op)
        except BaseException:
            self._routes.pop(seq, None)
            raise
        return seq, answers

    def end_route(self, seq: int) -> None:
        self._routes.pop(seq, None)

    async def write(self, call: Any, seq: int, **op: Any) -> None:
        frame = self._frame(seq, **op)
        propagate.inject(frame.trace_context)  # the caller's span: the trace crosses the link (X6)
        try:
            async with self._write_lock:
                await call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            await self._drop(unavailable(f"the {self.name} to messaging broke: {exc}"))
            raise unavailable(f"the {self.name} to messaging broke; retry") from exc

    async def next(self, answers: asyncio.Queue[Resp | BimipError]) -> Resp:
        """The next answer on a route; a refusal or a broken link is raised."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):  # not wait_for: see bimip.core.aio
                answer = await answers.get()
        except TimeoutError:
            raise unavailable("messaging did not answer in time; retry") from None
        if isinstance(answer, BimipError):
            raise answer
        if answer.HasField("error"):
            raise BimipError.from_proto(answer.error)
        return answer

    async def current_call(self) -> Any:
        return await self._connected()

    async def _connected(self) -> Any:
        async with self._lock:
            if self._closed:
                raise unavailable(f"the {self.name} is closing")
            if self._call is not None and not self._call.done():
                return self._call
            if self._failures:
                await self._clock.sleep(
                    RECONNECT_BACKOFF_S[min(self._failures, len(RECONNECT_BACKOFF_S)) - 1]
                )
            if self._channel is None:
                self._channel = grpc.aio.insecure_channel(
                    self._address,
                    options=[("grpc.service_config", ROUND_ROBIN)],
                    interceptors=self._telemetry.client_interceptors(),
                )
            stub = internal_pb2_grpc.MessagingInternalServiceStub(self._channel)
            self._call = self._open(stub)
            self._reader = asyncio.create_task(self._read(self._call), name=f"{self.name}-reader")
            return self._call

    async def _read(self, call: Any) -> None:
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                self._failures = 0
                answers = self._routes.get(response.seq)
                if answers is not None:
                    answers.put_nowait(response)
            reason = "messaging closed the link"
        except grpc.aio.AioRpcError as exc:
            reason = f"the {self.name} to messaging broke: {exc.code().name} {exc.details()}"
        except asyncio.CancelledError:
            return
        self._failures += 1
        log.warning("%s: %s", self.name, reason)
        self._fail_waiting(unavailable(reason))

    async def _drop(self, error: BimipError) -> None:
        call, reader = self._call, self._reader
        self._call = self._reader = None
        if call is not None:
            call.cancel()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._fail_waiting(error)

    def _fail_waiting(self, error: BimipError) -> None:
        for answers in self._routes.values():
            answers.put_nowait(error)


class PresenceLink(_Link[internal_pb2.PresenceLinkRequest, internal_pb2.PresenceLinkResponse]):
    """Awareness's end: DeviceOnline, ResumeConversation, BlockChange (SPEC A2, A4, A6, M11)."""

    name = "presence link"

    def _open(self, stub: Any) -> Any:
        return stub.PresenceLink(metadata=self._credentials.metadata())

    def _frame(self, seq: int, **op: Any) -> internal_pb2.PresenceLinkRequest:
        return internal_pb2.PresenceLinkRequest(seq=seq, **op)

    async def send(self, **event: Any) -> internal_pb2.PresenceLinkResponse:
        """Send one event (e.g. `block_change=BlockChange(...)`) and return messaging's answer."""
        return await self.request(**event)


class LogLink(_Link[internal_pb2.LogLinkRequest, internal_pb2.LogLinkResponse]):
    """Sync's end: reads, appends, acks and device lists of users' logs (SPEC S2, S5, S6, S7)."""

    name = "log link"

    def _open(self, stub: Any) -> Any:
        return stub.LogLink(metadata=self._credentials.metadata())

    def _frame(self, seq: int, **op: Any) -> internal_pb2.LogLinkRequest:
        return internal_pb2.LogLinkRequest(seq=seq, **op)

    async def read(
        self,
        eid: str,
        device_id: str,
        after: int,
        *,
        page_size: int,
        window: int = 2,
    ) -> AsyncGenerator[internal_pb2.LogPage, None]:
        """The pages of a read after `after`, as `device_id` sees them (every entry if it is
        empty). Up to `window` pages are in flight: each page taken grants one more, and leaving
        early ends the read on messaging's side."""
        request = internal_pb2.ReadLog(
            reader=common_pb2.Identity(eid=eid, device_id=device_id),
            after_offset=after,
            page_size=page_size,
            initial_credit=window,
        )
        seq, answers = await self.open_route(read=request)
        more = True
        try:
            while more:
                page = (await self.next(answers)).page
                more = page.more
                yield page
                if more:
                    await self.write(await self.current_call(), seq, credit=internal_pb2.ReadCredit(pages=1))
        finally:
            self.end_route(seq)
            if more and self._call is not None and not self._call.done():
                # Best effort: a link that broke meanwhile ended the read anyway.
                try:
                    await self.write(self._call, seq, credit=internal_pb2.ReadCredit(cancel=True))
                except BimipError:
                    pass

    async def append(
        self, eid: str, device_id: str, messages: list[common_pb2.Message]
    ) -> internal_pb2.AppendResults:
        answer = await self.request(
            append=internal_pb2.AppendMessages(
                device=common_pb2.Identity(eid=eid, device_id=device_id), messages=messages
            )
        )
        return answer.appended

    async def ack(self, eid: str, device_id: str, offset: int) -> int:
        answer = await self.request(
            ack=internal_pb2.AckLog(device=common_pb2.Identity(eid=eid, device_id=device_id), offset=offset)
        )
        return answer.cursor.cursor

    async def devices(self, eid: str) -> messaging_pb2.GetCommitOffsetResponse:
        answer = await self.request(list_devices=internal_pb2.ListDevices(eid=eid))
        return answer.devices

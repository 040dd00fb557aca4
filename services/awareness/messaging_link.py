"""Awareness's end of the PresenceLink stream to messaging (SPEC X1, M11, A2, A4, A6).

One long-lived bidirectional stream, opened on first use with service credentials. Each event
gets a seq and is answered by messaging with that seq; callers await their answer with a
deadline. If the stream breaks, the events waiting on it fail with UNAVAILABLE and the next event
opens a new stream (after a short backoff), so messaging restarting costs a retry, not a stuck link.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc

from bimip.core.auth import ServiceCredentials
from bimip.core.clock import Clock
from bimip.core.errors import BimipError
from bimip.core.telemetry import Telemetry
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = (0.05, 0.2, 1.0, 2.0)


def _unavailable(message: str) -> BimipError:
    return BimipError(grpc.StatusCode.UNAVAILABLE, "MESSAGING_UNAVAILABLE", message)


class PresenceLink:
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
        self._waiting: dict[int, asyncio.Future[internal_pb2.PresenceLinkResponse]] = {}
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()
        self._failures = 0
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        await self._drop(_unavailable("awareness is shutting down"))
        if self._channel is not None:
            await self._channel.close()

    async def send(self, **event: Any) -> internal_pb2.PresenceLinkResponse:
        """Send one event (e.g. `block_change=BlockChange(...)`) and return messaging's answer.

        Raises BimipError: UNAVAILABLE / MESSAGING_UNAVAILABLE if messaging cannot be reached or
        does not answer in time, or the refusal messaging answered with.
        """
        call = await self._connected()
        seq = next(self._seq)
        answer: asyncio.Future[internal_pb2.PresenceLinkResponse] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        try:
            await call.write(internal_pb2.PresenceLinkRequest(seq=seq, **event))
            response = await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            await self._drop(_unavailable(f"the link to messaging broke: {exc}"))
            raise _unavailable("the link to messaging broke; retry") from exc
        except TimeoutError:
            raise _unavailable("messaging did not answer in time; retry") from None
        finally:
            self._waiting.pop(seq, None)
        if response.HasField("error"):
            error = response.error
            raise BimipError(_status_code(error.code), error.reason, error.message, dict(error.metadata))
        return response

    async def _connected(self) -> Any:
        async with self._lock:
            if self._closed:
                raise _unavailable("awareness is shutting down")
            if self._call is not None and not self._call.done():
                return self._call
            if self._failures:
                await self._clock.sleep(
                    RECONNECT_BACKOFF_S[min(self._failures, len(RECONNECT_BACKOFF_S)) - 1]
                )
            if self._channel is None:
                self._channel = grpc.aio.insecure_channel(
                    self._address, interceptors=self._telemetry.client_interceptors()
                )
            stub = internal_pb2_grpc.MessagingInternalServiceStub(self._channel)
            self._call = stub.PresenceLink(metadata=self._credentials.metadata())
            self._reader = asyncio.create_task(self._read(self._call), name="presence-link-reader")
            return self._call

    async def _read(self, call: Any) -> None:
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                self._failures = 0
                waiting = self._waiting.get(response.seq)
                if waiting is not None and not waiting.done():
                    waiting.set_result(response)
            reason = "messaging closed the link"
        except grpc.aio.AioRpcError as exc:
            reason = f"the link to messaging broke: {exc.code().name} {exc.details()}"
        except asyncio.CancelledError:
            return
        self._failures += 1
        log.warning("presence link: %s", reason)
        self._fail_waiting(_unavailable(reason))

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
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)


def _status_code(number: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN)

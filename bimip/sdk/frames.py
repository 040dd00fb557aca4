"""One open bidirectional stream as the SDK uses it: serialized writes, client-chosen frame
numbers (`seq`), and answers matched back to the frame that asked."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from bimip.messaging.v1 import messaging_pb2
from bimip.sdk.errors import BimipClientError

ANSWER_TIMEOUT_S = 30.0


class ConnectionLost(Exception):
    """The stream broke (or was never open); a supervisor reconnects."""


def deliveries_in(
    frame: messaging_pb2.ConnectResponse,
) -> list[tuple[messaging_pb2.Delivery, Mapping[str, str]]]:
    """The deliveries a messaging Connect frame carries, in offset order, each with its trace
    context: a `delivery` frame's is the frame's own, each entry of a `deliveries` frame carries
    its own. Empty for any other frame."""
    kind = frame.WhichOneof("frame")
    if kind == "delivery":
        return [(frame.delivery, frame.trace_context)]
    if kind == "deliveries":
        return [(delivery, delivery.trace_context) for delivery in frame.deliveries.deliveries]
    return []


def offline(what: str = "not connected; try again when connected") -> BimipClientError:
    return BimipClientError(grpc.StatusCode.UNAVAILABLE, "OFFLINE", what)


class Frames:
    """Writes to the current call and matches answers to the frames that asked, by seq."""

    def __init__(self) -> None:
        self.call: Any = None
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()
        self._waiting: dict[int, asyncio.Future[Any]] = {}

    def next_seq(self) -> int:
        return next(self._seq)

    @property
    def open(self) -> bool:
        return self.call is not None

    async def write(self, request: Any) -> None:
        call = self.call
        if call is None:
            raise ConnectionLost()
        try:
            async with self._lock:
                await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            raise ConnectionLost() from exc

    async def ask(self, make: Callable[[int], Any]) -> Any:
        """Write the frame `make(seq)` and return the answer with its seq; a per-frame error
        raises BimipClientError, a lost connection OFFLINE."""
        if self.call is None:
            raise offline()
        seq = self.next_seq()
        future = self._waiting[seq] = asyncio.get_running_loop().create_future()
        try:
            await self.write(make(seq))
            async with asyncio.timeout(ANSWER_TIMEOUT_S):  # not wait_for: see bimip.core.aio
                answer = await future
        except (ConnectionLost, TimeoutError):
            raise offline("the connection was lost; try again") from None
        finally:
            self._waiting.pop(seq, None)
        if answer.WhichOneof("frame") == "error":
            raise BimipClientError.from_frame(answer.error)
        return answer

    def answered(self, frame: Any) -> bool:
        """Hand `frame` to the ask waiting for its seq; False if none waits."""
        future = self._waiting.get(frame.seq)
        if future is None or future.done():
            return False
        future.set_result(frame)
        return True

    def lost(self, error: BaseException | None = None) -> None:
        """The call is gone: every waiting ask fails."""
        self.call = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error or ConnectionLost())
                future.exception()  # an ask that gave up waiting must not log it as unretrieved


QUICK_RETRIES = 2
"""Attempts made at once, without backoff, after INTERNAL before a stream opened (see `run`)."""


class Supervisor:
    """Runs a stream's session again and again, with exponential backoff and jitter between
    attempts, and reports the connection's state. A refused token ends it (`fatal`)."""

    def __init__(
        self,
        service: str,
        session: Callable[[Supervisor], Awaitable[None]],
        report: Callable[[str, str, str], None],
        backoff: tuple[float, float],
        on_down: Callable[[], None],
    ) -> None:
        self.service = service
        self._session = session
        self._report = report
        self._backoff = backoff
        self._on_down = on_down
        self.attempted = asyncio.Event()  # the first attempt connected or failed
        self.connected = False
        self.fatal: BimipClientError | None = None
        self.state = "closed"

    def up(self) -> None:
        """Called by the session once its stream is open."""
        self.connected = True
        self._set("connected")
        self.attempted.set()

    def _set(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.state = state
            self._report(self.service, state, error)

    async def run(self) -> None:
        failures = 0
        quick = 0  # INTERNAL before the stream opened, asked again at once
        while True:
            self.connected = False
            try:
                await self._session(self)
                error = "the server ended the stream"
            except grpc.aio.AioRpcError as err:
                failure = BimipClientError.from_rpc(err)
                if err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self.fatal = failure
                    self._set("closed", str(failure))
                    self.attempted.set()
                    return
                if err.code() == grpc.StatusCode.INTERNAL and not self.connected and quick < QUICK_RETRIES:
                    # grpc.aio reports INTERNAL, and loses the server's status, when the open
                    # frame's write races the server refusing the stream (a bad token): ask
                    # again at once, so a refusal surfaces as itself (and `start()` raises it).
                    quick += 1
                    continue
                error = str(failure)
            except (ConnectionLost, BimipClientError, TimeoutError) as exc:
                error = str(exc) or type(exc).__name__
            finally:
                self._on_down()
            quick = 0
            self.attempted.set()
            self._set("reconnecting", error)
            failures = 1 if self.connected else failures + 1
            low, high = self._backoff
            await asyncio.sleep(min(high, low * 2 ** (failures - 1)) * random.uniform(0.5, 1.5))

"""The pub/sub bus between replicas (SPEC A8, X5, X6, X8).

One interface, two implementations:

- `InProcessBus` — the embedded default. Buses that share one `InProcessBroker` see each other's
  messages, like replicas sharing one Redis; by default each bus has a private broker.
- `RedisBus` — at scale. One Redis `PubSub` connection per bus multiplexes every local subscription.

Both put the same bytes on the "wire": a `bimip.bus.v1.Envelope` carrying the body, the publishing
replica (`origin`) and the W3C trace context of the publishing span, on the channel
`f"{namespace}:{channel}"`.

Delivery is best effort, as Redis pub/sub is: a message can be missed (a Redis reconnection, a slow
subscriber whose bounded queue overflowed). The log in the database is the truth, so a missed message
loses nothing; the subscriber learns that it may have missed something from `BusMessage.gap` on the
next message it receives and then reads from storage. Publish only after the database commit
(`PendingPublishes`). Order is FIFO per channel. A publisher never waits for a subscriber.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Self

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer, TracerProvider
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from bimip.bus.v1 import bus_pb2

__all__ = [
    "Bus",
    "BusError",
    "BusMessage",
    "InProcessBroker",
    "InProcessBus",
    "PendingPublishes",
    "RedisBus",
    "Subscription",
    "consumer_span",
    "redis_client",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 10_000
REDIS_POOL_SIZE = 64
"""Connections per Redis client. A burst of commands beyond it waits for a free connection (up to
the socket timeout) instead of failing, as redis-py's default pool does past 100."""


def redis_client(url: str, *, socket_timeout: float = 5.0, **options: Any) -> aioredis.Redis:
    """A Redis client on a bounded, blocking connection pool of `REDIS_POOL_SIZE` connections."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_POOL_SIZE,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        **options,
    )
    return aioredis.Redis.from_pool(pool)


class BusError(Exception):
    """The bus cannot do what was asked: it is closed, or Redis is unreachable."""


@dataclass(frozen=True, slots=True)
class BusMessage:
    """One message as a subscriber receives it."""

    channel: str
    """The channel it was published on, without the namespace prefix."""
    body: bytes
    context: Context = field(compare=False)
    """The OpenTelemetry context of the publishing span (parent for a CONSUMER span)."""
    origin: str
    """The replica that published it."""
    gap: bool = False
    """True when messages before this one may have been missed: read from storage."""


class Bus(Protocol):
    async def publish(self, channel: str, body: bytes) -> None:
        """Publish one message. Raises BusError if it could not be handed to the transport."""
        ...

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish several messages in order (Redis: one pipelined round trip)."""
        ...

    async def subscribe(self, *channels: str) -> Subscription:
        """A new subscription; every message published after this returns is delivered to it."""
        ...

    async def ping(self) -> bool:
        """Health: False when the transport is unreachable or the bus is closed. Never raises."""
        ...

    async def close(self) -> None:
        """Close every subscription and release the connections. Idempotent."""
        ...


class _Hub(Protocol):
    """What a Subscription needs from the bus that made it."""

    async def _attach(self, sub: Subscription, channels: Sequence[str]) -> None: ...

    def _detach(self, sub: Subscription, channels: Iterable[str]) -> None: ...

    def _forget(self, sub: Subscription) -> None: ...

    async def _settle(self) -> None: ...


class Subscription:
    """An async iterator of `BusMessage` for a changing set of channels.

    The queue is bounded: when it is full, the oldest message is dropped and the next message
    received has `gap=True`. After `close()` (or the bus closing) iteration ends.
    """

    def __init__(self, hub: _Hub, *, prefix: str, max_queue: int) -> None:
        self._hub = hub
        self._cut = len(prefix)
        self._max_queue = max_queue
        self._channels: set[str] = set()
        self._queue: deque[BusMessage] = deque()
        self._gap = False
        self._dropped = 0
        self._closed = False
        self._wakeup = asyncio.Event()

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._channels)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Messages queued and not yet received."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Messages dropped so far because the queue was full."""
        return self._dropped

    async def add(self, *channels: str) -> None:
        """Subscribe to more channels; returns once messages published from now on will arrive."""
        if self._closed:
            raise BusError("subscription is closed")
        new = [c for c in dict.fromkeys(channels) if c not in self._channels]
        for channel in new:
            _check_channel(channel)
        if new:
            await self._hub._attach(self, new)

    async def remove(self, *channels: str) -> None:
        """Unsubscribe; queued messages from those channels are dropped and no more arrive."""
        gone = [c for c in dict.fromkeys(channels) if c in self._channels]
        if gone:
            self._hub._detach(self, gone)
            await self._hub._settle()

    async def close(self) -> None:
        """Unsubscribe from everything and end iteration. Idempotent."""
        if self._closed:
            return
        self._shutdown()
        await self._hub._settle()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> BusMessage:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        message = self._queue.popleft()
        if self._gap:
            self._gap = False
            message = replace(message, gap=True)
        return message

    # --- used by the buses ---------------------------------------------------------------------

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub._detach(self, list(self._channels))
        self._hub._forget(self)
        self._queue.clear()
        self._wakeup.set()

    def _push(self, wire: str, body: bytes, context: Context, origin: str) -> None:
        if self._closed:
            return
        channel = wire[self._cut :]
        if channel not in self._channels:
            return
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._dropped += 1
            self._gap = True
        self._queue.append(BusMessage(channel, body, context, origin))
        self._wakeup.set()

    def _purge(self, channels: Iterable[str]) -> None:
        gone = set(channels)
        self._channels.difference_update(gone)
        if self._queue:
            kept = [m for m in self._queue if m.channel not in gone]
            if len(kept) != len(self._queue):
                self._queue = deque(kept)

    def _mark_gap(self) -> None:
        self._gap = True


def consumer_span(
    tracer: Tracer, message: BusMessage, name: str = "bus receive"
) -> AbstractContextManager[Span]:
    """A CONSUMER span for handling `message`, a child of the publishing span."""
    return tracer.start_as_current_span(
        name,
        context=message.context,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.operation.type": "process",
            "messaging.destination.name": message.channel,
            "bimip.bus.origin": message.origin,
        },
    )


class PendingPublishes:
    """Messages to publish once the database transaction commits (SPEC X5).

    `add` while the transaction runs; after the commit, `flush(bus)`; on rollback, `discard()`.
    A flush that fails is logged, not raised: the commit has happened and the log is the truth.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, bytes]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, channel: str, body: bytes) -> None:
        self._items.append((channel, body))

    async def flush(self, bus: Bus) -> None:
        items, self._items = self._items, []
        if not items:
            return
        try:
            await bus.publish_many(items)
        except BusError as exc:
            logger.warning("bus: %d message(s) not published after commit: %s", len(items), exc)

    def discard(self) -> None:
        self._items.clear()


# --- shared machinery ------------------------------------------------------------------------------


def _check_channel(channel: object) -> None:
    if not isinstance(channel, str) or not channel:
        raise ValueError(f"a channel is a non-empty str, not {channel!r}")


def _encode(body: bytes, carrier: dict[str, str], origin: str) -> bytes:
    if not isinstance(body, bytes):
        raise TypeError(f"a message body is bytes, not {type(body).__name__}")
    envelope = bus_pb2.Envelope(trace_context=carrier, body=body, origin=origin)
    data: bytes = envelope.SerializeToString()
    return data


def _dispatch(subs: Iterable[Subscription], wire: str, data: bytes) -> None:
    """Decode one envelope and queue it for every subscription (never blocks)."""
    try:
        envelope = bus_pb2.Envelope.FromString(data)
    except DecodeError:
        logger.warning("bus: dropped a message on %s that is not an Envelope", wire)
        return
    context = propagate.extract(dict(envelope.trace_context))
    body: bytes = envelope.body
    origin: str = envelope.origin
    for sub in tuple(subs):
        sub._push(wire, body, context, origin)


class _BusBase:
    _system = "bimip"

    def __init__(
        self,
        *,
        namespace: str,
        origin: str,
        tracer_provider: TracerProvider | None,
        max_queue: int,
        routes: dict[str, set[Subscription]],
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._namespace = namespace
        self._prefix = f"{namespace}:"
        self._origin = origin
        self._max_queue = max_queue
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._routes = routes  # wire channel -> local subscriptions
        self._subs: set[Subscription] = set()
        self._closed = False

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def origin(self) -> str:
        return self._origin

    async def publish(self, channel: str, body: bytes) -> None:
        await self.publish_many(((channel, body),))

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        batch = list(items)
        if not batch:
            return
        if self._closed:
            raise BusError("bus is closed")
        for channel, _ in batch:
            _check_channel(channel)
        attributes: dict[str, str | int] = {
            "messaging.system": self._system,
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
        }
        if len(batch) == 1:
            attributes["messaging.destination.name"] = batch[0][0]
        else:
            attributes["messaging.batch.message_count"] = len(batch)
        with self._tracer.start_as_current_span("bus publish", kind=SpanKind.PRODUCER, attributes=attributes):
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            wire_items = [(self._prefix + ch, _encode(body, carrier, self._origin)) for ch, body in batch]
            await self._send(wire_items)

    async def subscribe(self, *channels: str) -> Subscription:
        if self._closed:
            raise BusError("bus is closed")
        sub = Subscription(self, prefix=self._prefix, max_queue=self._max_queue)
        self._subs.add(sub)
        try:
            await sub.add(*channels)
        except BaseException:
            sub._shutdown()
            raise
        return sub

    async def _send(self, items: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    async def _attach(self, sub: Subscription, channels: Sequence[str]) -> None:
        raise NotImplementedError

    def _attach_local(self, sub: Subscription, channels: Sequence[str]) -> list[str]:
        """Route `channels` to `sub`; returns their wire names."""
        wires = []
        for channel in channels:
            wire = self._prefix + channel
            self._routes.setdefault(wire, set()).add(sub)
            sub._channels.add(channel)
            wires.append(wire)
        return wires

    def _detach(self, sub: Subscription, channels: Iterable[str]) -> None:
        gone = list(channels)
        for channel in gone:
            wire = self._prefix + channel
            subs = self._routes.get(wire)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._routes[wire]
        sub._purge(gone)
        self._routes_changed()

    def _routes_changed(self) -> None:
        pass

    def _forget(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    async def _settle(self) -> None:
        pass

    def _close_subscriptions(self) -> None:
        self._closed = True
        for sub in list(self._subs):
            sub._shutdown()


# --- in process ------------------------------------------------------------------------------------


class InProcessBroker:
    """The in-process stand-in for a Redis server: buses sharing one see each other's messages."""

    def __init__(self) -> None:
        self._routes: dict[str, set[Subscription]] = {}

    def _publish(self, wire: str, data: bytes) -> None:
        subs = self._routes.get(wire)
        if subs:
            _dispatch(subs, wire, data)


class InProcessBus(_BusBase):
    """The embedded bus: same envelope bytes and semantics as Redis, delivered in this process."""

    _system = "bimip_in_process"

    def __init__(
        self,
        *,
        namespace: str,
        origin: str,
        tracer_provider: TracerProvider | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        broker: InProcessBroker | None = None,
    ) -> None:
        self._broker = broker if broker is not None else InProcessBroker()
        super().__init__(
            namespace=namespace,
            origin=origin,
            tracer_provider=tracer_provider,
            max_queue=max_queue,
            routes=self._broker._routes,
        )

    async def _send(self, items: list[tuple[str, bytes]]) -> None:
        for wire, data in items:
            self._broker._publish(wire, data)

    async def _attach(self, sub: Subscription, channels: Sequence[str]) -> None:
        self._attach_local(sub, channels)

    async def ping(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._close_subscriptions()


# --- Redis -----------------------------------------------------------------------------------------


class _Conn:
    """One PubSub connection and what has been sent on it."""

    def __init__(self, pubsub: PubSub) -> None:
        self.pubsub = pubsub
        self.server_set: set[str] = set()  # channels whose last command sent was SUBSCRIBE
        self.outstanding: dict[str, int] = {}  # SUBSCRIBE/UNSUBSCRIBE commands not yet acknowledged

    def confirmed(self, wire: str) -> bool:
        return wire in self.server_set and not self.outstanding.get(wire)


async def _aclose_quietly(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:
        logger.debug("bus: error closing a pubsub connection: %r", exc)


class RedisBus(_BusBase):
    """The bus over Redis pub/sub.

    All local subscriptions share ONE PubSub connection; a Redis channel is subscribed once however
    many local subscriptions want it and unsubscribed when the last one leaves. A reader task
    dispatches to the per-subscription queues. After a connection error the reader reconnects with
    backoff and resubscribes; once a channel's resubscription is acknowledged, the next message each
    of its subscribers receives has `gap=True`. (The gap is reported with that next message; a
    channel that stays silent after a reconnection reports nothing.)
    """

    _system = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        origin: str,
        tracer_provider: TracerProvider | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        socket_timeout: float = 5.0,
        client_name: str | None = None,
        poll_interval: float = 1.0,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        super().__init__(
            namespace=namespace,
            origin=origin,
            tracer_provider=tracer_provider,
            max_queue=max_queue,
            routes={},
        )
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "client_name": client_name,
        }
        # Commands: a couple of quick retries ride over a blip without holding an RPC for long.
        self._client = redis_client(
            url, retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2), **common
        )
        # The subscriber connection must never reconnect behind our back: redis-py would resubscribe
        # silently and nobody would learn that messages were missed. Errors surface; we reconnect.
        self._sub_client = aioredis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 0, supported_errors=()), **common
        )
        self._ping_timeout = min(socket_timeout, 2.0)
        self._poll_interval = poll_interval
        self._backoff_min, self._backoff_max = reconnect_backoff
        self._conn: _Conn | None = None
        self._ever_connected = False
        self._gap_on_ack: set[str] = set()  # channels to flag gap on at their next SUBSCRIBE ack
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._dirty = False

    @property
    def connected(self) -> bool:
        """Whether the subscriber connection is up (False before the first subscribe)."""
        return self._conn is not None

    # --- publishing ----------------------------------------------------------------------------

    async def _send(self, items: list[tuple[str, bytes]]) -> None:
        try:
            if len(items) == 1:
                await self._client.publish(*items[0])
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for wire, data in items:
                        pipe.publish(wire, data)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BusError(f"publish failed: {exc}") from exc

    async def ping(self) -> bool:
        if self._closed:
            return False
        try:
            async with asyncio.timeout(self._ping_timeout):
                return bool(await self._client.ping())
        except Exception as exc:  # noqa: BLE001 - health never raises; any failure means unhealthy
            logger.debug("bus: ping failed: %r", exc)
            return False

    # --- subscriptions -------------------------------------------------------------------------

    async def _attach(self, sub: Subscription, channels: Sequence[str]) -> None:
        if self._closed:
            raise BusError("bus is closed")
        wires = self._attach_local(sub, channels)
        conn = self._conn
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for wire in wires:
            if conn is not None and conn.confirmed(wire):
                continue
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(wire, []).append(fut)
            waits.append(fut)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop(), name=f"bus-reader:{self._namespace}")
        self._routes_changed()
        if waits:
            await asyncio.wait(waits)  # does not cancel the shared futures if we are cancelled
        if self._closed:
            raise BusError("bus is closed")

    def _routes_changed(self) -> None:
        """Bring the Redis subscriptions in line with the local routes (in the background)."""
        if self._closed:
            return
        self._dirty = True
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.create_task(self._reconcile_loop(), name=f"bus-sync:{self._namespace}")

    async def _settle(self) -> None:
        task = self._reconciler
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait([task])

    async def _reconcile_loop(self) -> None:
        while self._dirty and not self._closed:
            self._dirty = False
            await self._reconcile_once()

    async def _reconcile_once(self) -> None:
        desired = set(self._routes)
        for wire in [w for w in self._waiters if w not in desired]:
            self._resolve(wire)  # nobody wants it any more: do not keep anyone waiting
        self._gap_on_ack &= desired
        conn = self._conn
        if conn is None:
            return  # the reader reconciles again once it has reconnected
        add = sorted(desired - conn.server_set)
        drop = sorted(conn.server_set - desired)
        # Book-keeping first: the reader may read the acknowledgement before the send returns.
        for wire in add:
            conn.server_set.add(wire)
            conn.outstanding[wire] = conn.outstanding.get(wire, 0) + 1
        for wire in drop:
            conn.server_set.discard(wire)
            conn.outstanding[wire] = conn.outstanding.get(wire, 0) + 1
        try:
            if add:
                await conn.pubsub.subscribe(*add)
            # Never send on a PubSub that was discarded meanwhile: it would take a new connection.
            if drop and conn is self._conn:
                await conn.pubsub.unsubscribe(*drop)
        except Exception as exc:  # noqa: BLE001 - a connection closed under us fails in many ways
            await self._discard(conn, exc)

    def _resolve(self, wire: str) -> None:
        for fut in self._waiters.pop(wire, ()):
            if not fut.done():
                fut.set_result(None)

    # --- the reader ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = self._backoff_min
        while not self._closed:
            conn = self._conn
            if conn is None:
                if await self._connect():
                    delay = self._backoff_min
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
                continue
            try:
                message = await conn.pubsub.get_message(timeout=self._poll_interval)
            except (RedisError, OSError) as exc:
                await self._discard(conn, exc)
                continue
            except Exception as exc:  # the reader must survive anything
                if conn is self._conn:
                    logger.exception("bus: unexpected error reading from Redis")
                await self._discard(conn, exc)
                continue
            if message is not None and conn is self._conn:
                self._handle(conn, message)

    async def _connect(self) -> bool:
        pubsub = self._sub_client.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            await _aclose_quietly(pubsub)
            logger.warning("bus: cannot connect the subscriber to Redis: %s", exc)
            return False
        if self._closed:
            await _aclose_quietly(pubsub)
            return False
        if self._ever_connected:
            logger.info(
                "bus: subscriber reconnected to Redis; resubscribing %d channel(s)", len(self._routes)
            )
            self._gap_on_ack.update(self._routes)
        self._ever_connected = True
        self._conn = _Conn(pubsub)
        self._routes_changed()
        return True

    async def _discard(self, conn: _Conn, exc: BaseException) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if not self._closed:
            logger.warning("bus: subscriber connection to Redis lost: %s", exc)
        await _aclose_quietly(conn.pubsub)

    def _handle(self, conn: _Conn, message: dict[str, Any]) -> None:
        kind = message.get("type")
        raw = message.get("channel")
        wire = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "message":
            subs = self._routes.get(wire)
            data = message.get("data")
            if subs and isinstance(data, bytes):
                _dispatch(subs, wire, data)
        elif kind in ("subscribe", "unsubscribe"):
            left = conn.outstanding.get(wire, 0) - 1
            if left > 0:
                conn.outstanding[wire] = left
            else:
                conn.outstanding.pop(wire, None)
            if kind == "subscribe" and wire in self._gap_on_ack:
                self._gap_on_ack.discard(wire)
                for sub in self._routes.get(wire, ()):
                    sub._mark_gap()
            if conn.confirmed(wire):
                self._resolve(wire)

    # --- closing -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._close_subscriptions()
        for wire in list(self._waiters):
            self._resolve(wire)
        tasks = [t for t in (self._reader, self._reconciler) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        conn, self._conn = self._conn, None
        if conn is not None:
            await _aclose_quietly(conn.pubsub)
        await self._client.aclose()
        await self._sub_client.aclose()

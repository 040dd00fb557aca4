"""The one writing task of a messaging process: group commit of every change to the logs.

Every write (a send, an ack, a mark, a command, a device seen, a block) is an `Op`. The `Writer`
takes whatever ops are queued when it is free (up to `batch_max`) and applies them in one
transaction, so throughput does not stop at one transaction per message. Each op first checks
(reads only), then writes; a refused op raises `BimipError` before writing anything, so the rest of
the batch commits. Log appends are deferred to the end of the transaction, where offsets are taken
with one upsert per user log, in eid order (so two replicas' transactions never deadlock on log rows),
and the entries are inserted in bulk. Only after the commit are the ops answered and the new heads
published (SPEC M2, X5). A batch that fails as a whole (a concurrent replica took the same client id,
a deadlock) is retried op by op, so one op's failure is its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Tracer
from sqlalchemy import Table, TextClause, bindparam, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bimip.common.v1 import common_pb2
from bimip.core.clock import Clock
from bimip.core.errors import BimipError
from bimip.core.metrics import Metrics
from bimip.core.storage import upsert_statement
from services.messaging import store

log = logging.getLogger(__name__)

Result = Callable[[], Any]
"""What an op answers, evaluated after the commit (when the offsets it appended are known)."""

RETRIES = 3


@dataclass(eq=False)
class Append:
    """One entry to add to a user's log; `offset` is set when the transaction takes offsets."""

    eid: str
    entry: common_pb2.Entry
    kind: int
    target_device: str | None
    signal_id: str
    trace_context: str | None
    offset: int = 0
    body: bytes = b""  # the serialized entry, once its offset is known

    def serialize(self) -> bytes:
        self.body = self.entry.SerializeToString()
        return self.body


class Batched(Protocol):
    async def flush(self, tx: Tx) -> None: ...


B = TypeVar("B", bound=Batched)


@dataclass
class Tx:
    """One transaction of the writer, shared by the ops of a batch."""

    conn: AsyncConnection
    now: datetime
    postgres: bool
    appends: list[Append] = field(default_factory=list)
    late_rows: list[tuple[Table, Callable[[], dict[str, Any]]]] = field(default_factory=list)
    heads: dict[str, int] = field(default_factory=dict)
    events: list[tuple[str, bytes]] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    _batched: list[Batched] = field(default_factory=list)

    def batched(self, key: str, factory: Callable[[], B]) -> B:
        """A batch-wide accumulator: ops add to it, and its `flush` runs once, before offsets are
        taken, so many ops cost a few bulk statements instead of a few statements each."""
        found = self.cache.get(key)
        if found is None:
            found = self.cache[key] = factory()
            self._batched.append(found)
        return found

    def append(
        self,
        eid: str,
        entry: common_pb2.Entry,
        *,
        kind: int,
        signal_id: str,
        target_device: str | None = None,
        trace_context: str | None = None,
    ) -> Append:
        item = Append(eid, entry, kind, target_device, signal_id, trace_context)
        self.appends.append(item)
        return item

    def insert_later(self, table: Table, row: Callable[[], dict[str, Any]]) -> None:
        """Insert a row once offsets are known (rows that name offsets)."""
        self.late_rows.append((table, row))

    def publish(self, channel: str, body: bytes) -> None:
        """Publish on the bus after the commit."""
        self.events.append((channel, body))

    def upsert(
        self, key: str, table: Table, columns: Sequence[str], on_conflict: Callable[[Any], Any]
    ) -> TextClause:
        """`on_conflict(insert)` on the dialect's INSERT into `table`, for parameter rows with
        `columns`, compiled once per process (see `upsert_statement`); `key` names it."""
        return upsert_statement(self.conn, key, table, columns, on_conflict)

    def lock(self, statement: Any) -> Any:
        """SELECT … FOR UPDATE on PostgreSQL; SQLite's writer already holds the database lock."""
        return statement.with_for_update() if self.postgres else statement

    async def finish(self) -> None:
        """Flush the accumulators, take offsets for every append (one upsert of every log row
        touched, in eid order) and insert the rows."""
        for accumulator in self._batched:
            await accumulator.flush(self)
        by_eid: dict[str, list[Append]] = defaultdict(list)
        for item in self.appends:
            by_eid[item.eid].append(item)
        eids = sorted(by_eid)
        if eids:
            # One executemany in eid order (so two replicas lock log rows in the same order), then
            # the new heads.
            await self.conn.execute(
                self.upsert("messaging: log heads", store.logs, _LOG_HEAD_COLUMNS, _add_to_head),
                [{"eid": eid, "head": len(by_eid[eid]), "first_offset": 1} for eid in eids],
            )
            for chunk in chunks(eids):
                for eid, head in await self.conn.execute(_HEADS, {"eids": chunk}):
                    items = by_eid[eid]
                    for offset, item in enumerate(items, start=head - len(items) + 1):
                        item.offset = offset
                        item.entry.offset = offset
                    self.heads[eid] = head
        if self.appends:
            await self.conn.execute(
                insert(store.entries),
                [
                    {
                        "eid": a.eid,
                        "offset": a.offset,
                        "kind": a.kind,
                        "peer_eid": a.entry.peer_eid,
                        "author_eid": a.entry.author.eid,
                        "author_device": a.entry.author.device_id,
                        "target_device": a.target_device,
                        "signal_id": a.signal_id,
                        "created_at": self.now,
                        "trace_context": a.trace_context,
                        "body": a.serialize(),
                    }
                    for a in self.appends
                ],
            )
        grouped: dict[Table, list[dict[str, Any]]] = defaultdict(list)
        for table, row in self.late_rows:
            grouped[table].append(row())
        for table, rows in grouped.items():
            await self.conn.execute(insert(table), rows)


_LOG_HEAD_COLUMNS = ("eid", "head", "first_offset")
_HEADS = select(store.logs.c.eid, store.logs.c.head).where(
    store.logs.c.eid.in_(bindparam("eids", expanding=True))
)


def _add_to_head(insert: Any) -> Any:
    return insert.on_conflict_do_update(
        index_elements=[store.logs.c.eid], set_={"head": store.logs.c.head + insert.excluded.head}
    )


class Op(Protocol):
    """One write. `apply` checks, then writes through `tx`; it raises BimipError to refuse."""

    name: str
    context: Context | None

    async def apply(self, tx: Tx) -> Result: ...


Prepare = Callable[[Tx, Sequence[Op]], Awaitable[None]]
"""Batch-wide reads before the ops apply (e.g. every idempotency key of the batch in one query)."""


@dataclass(eq=False)
class _Queued:
    op: Op
    future: asyncio.Future[Any]


class Writer:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        tracer: Tracer,
        *,
        batch_max: int,
        prepare: Prepare | None = None,
        on_commit: Callable[[dict[str, int], list[tuple[str, bytes]], list[Append]], Awaitable[None]]
        | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._tracer = tracer
        self._batch_max = batch_max
        self._prepare = prepare
        self._on_commit = on_commit
        self._postgres = engine.dialect.name == "postgresql"
        self._queue: deque[_Queued] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.ops = 0
        self.retries = 0
        metrics = metrics or Metrics()
        self._commit_seconds = metrics.commit_seconds
        self._batch_size = metrics.commit_batch_size

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="messaging-writer")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, op: Op) -> Any:
        """Queue `op` (in call order) and wait for its result; raises what the op raised."""
        if self._closing:
            raise BimipError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(op, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(self._batch_max, len(self._queue)))]
            try:
                await self._commit_batch(batch)
            except Exception:
                log.exception("writer batch failed")

    async def _commit_batch(self, batch: list[_Queued]) -> None:
        try:
            outcomes, tx, span = await self._transaction(batch)
        except (IntegrityError, OperationalError, DBAPIError) as exc:
            if len(batch) == 1:
                await self._retry_alone(batch[0], exc)
                return
            log.info("writer: batch of %d failed (%s); retrying op by op", len(batch), type(exc).__name__)
            for queued in batch:
                await self._retry_alone(queued, exc)
            return
        await self._answer(batch, outcomes, tx, span)

    async def _retry_alone(self, queued: _Queued, first: BaseException) -> None:
        error: BaseException = first
        self.retries += 1
        log.info("writer: %s failed (%s); retrying it alone", queued.op.name, type(first).__name__)
        for attempt in range(RETRIES):
            try:
                outcomes, tx, span = await self._transaction([queued])
            except (IntegrityError, OperationalError, DBAPIError) as exc:
                error = exc
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            await self._answer([queued], outcomes, tx, span)
            return
        log.error("writer: %s failed after %d attempts: %r", queued.op.name, RETRIES, error)
        if not queued.future.done():
            queued.future.set_exception(
                BimipError(
                    grpc.StatusCode.UNAVAILABLE,
                    "STORAGE_UNAVAILABLE",
                    "the write could not be committed; retry it (sends are idempotent)",
                )
            )

    async def _transaction(self, batch: list[_Queued]) -> tuple[list[Result | BaseException], Tx, trace.Span]:
        links = [Link(s.get_span_context()) for q in batch if (s := _span_of(q.op.context)) is not None]
        parent = batch[0].op.context
        outcomes: list[Result | BaseException] = []
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            "messaging commit",
            context=parent,
            kind=SpanKind.INTERNAL,
            links=links[1:],
            attributes={"bimip.batch.size": len(batch)},
        ) as span:
            async with self._engine.begin() as conn:
                tx = Tx(conn, self._clock.now(), self._postgres)
                if self._prepare is not None:
                    await self._prepare(tx, [q.op for q in batch])
                for queued in batch:
                    try:
                        outcomes.append(await queued.op.apply(tx))
                    except BimipError as err:
                        outcomes.append(err)
                await tx.finish()
        self._commit_seconds.observe(time.perf_counter() - started)
        self._batch_size.observe(len(batch))
        self.batches += 1
        self.ops += len(batch)
        return outcomes, tx, span

    async def _answer(
        self,
        batch: list[_Queued],
        outcomes: list[Result | BaseException],
        tx: Tx,
        span: trace.Span,
    ) -> None:
        for queued, outcome in zip(batch, outcomes, strict=True):
            if queued.future.done():
                continue
            if isinstance(outcome, BaseException):
                queued.future.set_exception(outcome)
            else:
                try:
                    queued.future.set_result(outcome())
                except Exception as exc:
                    log.exception("writer: building the result of %s failed", queued.op.name)
                    queued.future.set_exception(exc)
        if self._on_commit is not None and (tx.heads or tx.events):
            # Publishing joins the batch's trace (the commit span is its parent).
            with trace.use_span(span, end_on_exit=False):
                await self._on_commit(tx.heads, tx.events, tx.appends)


def _span_of(context: Context | None) -> trace.Span | None:
    if context is None:
        return None
    span = trace.get_current_span(context)
    return span if span.get_span_context().is_valid else None


def chunks(items: Iterable[Any], size: int = 500) -> Iterable[list[Any]]:
    """Split an IN list so no statement exceeds the drivers' parameter limits."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

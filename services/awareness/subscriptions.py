"""Subscriptions and blocks (SPEC A6): who may see whose presence, stored in the database.

A subscription is one way: the subscriber asks, the target approves or denies. A block works both
ways: it ends the subscriptions between the two users (pending requests included), an unblock does
not restore them, and messaging is told over PresenceLink so that it refuses messages in both
directions (BLOCKED).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import grpc
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bimip.awareness.v1 import awareness_pb2
from bimip.core.clock import Clock, timestamp
from bimip.core.errors import BimipError, invalid
from bimip.core.ids import eid_problem
from bimip.messaging.v1 import internal_pb2
from services.awareness import store
from services.links import PresenceLink

PENDING = awareness_pb2.SUBSCRIPTION_STATE_PENDING
APPROVED = awareness_pb2.SUBSCRIPTION_STATE_APPROVED
DENIED = awareness_pb2.SUBSCRIPTION_STATE_DENIED
REMOVED = awareness_pb2.SUBSCRIPTION_STATE_REMOVED


def _subscription(subscriber: str, target: str, state: int, at: datetime) -> awareness_pb2.Subscription:
    return awareness_pb2.Subscription(
        subscriber_eid=subscriber,
        target_eid=target,
        state=awareness_pb2.SubscriptionState.ValueType(state),
        updated_at=timestamp(at),
    )


def check_other(caller: str, eid: str, field: str) -> None:
    problem = eid_problem(eid)
    if problem is not None:
        raise invalid("INVALID_EID", f"{field} {problem}", field=field)
    if eid == caller:
        raise invalid("SELF_SUBSCRIPTION", f"{field} is the caller: name another user", field=field)


class Subscriptions:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        link: PresenceLink,
        changed: Callable[[str, str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._engine = engine  # a writer engine: on SQLite its transactions hold the lock from the start
        self._clock = clock
        self._link = link
        self.changed = changed

    async def _notify(self, subscriber: str, target: str, state: int) -> None:
        if self.changed is not None:
            await self.changed(subscriber, target, state)

    async def approved_targets(self, subscriber: str) -> set[str]:
        """The users `subscriber` sees the presence of."""
        s = store.subscriptions
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(s.c.target_eid).where(s.c.subscriber_eid == subscriber, s.c.state == APPROVED)
            )
            return {row.target_eid for row in rows}

    async def may_see(self, watcher: str, target: str) -> str | None:
        """Why `watcher` may not receive `target`'s presence or activity (A3), or None if it may."""
        async with self._engine.connect() as conn:
            if await self._blocked(conn, watcher, target):
                return "BLOCKED"
            row = await self._state(conn, watcher, target)
        return None if row is not None and row.state == APPROVED else "NOT_SUBSCRIBED"

    async def _blocked(self, conn: AsyncConnection, a: str, b: str) -> bool:
        bl = store.blocks
        row = (
            await conn.execute(
                select(bl.c.blocker_eid).where(
                    or_(
                        and_(bl.c.blocker_eid == a, bl.c.blocked_eid == b),
                        and_(bl.c.blocker_eid == b, bl.c.blocked_eid == a),
                    )
                )
            )
        ).first()
        return row is not None

    async def _state(self, conn: AsyncConnection, subscriber: str, target: str) -> Any:
        s = store.subscriptions
        return (
            await conn.execute(
                select(s.c.state, s.c.updated_at).where(
                    s.c.subscriber_eid == subscriber, s.c.target_eid == target
                )
            )
        ).first()

    async def _put(
        self, conn: AsyncConnection, subscriber: str, target: str, state: int, exists: bool
    ) -> datetime:
        s = store.subscriptions
        now = self._clock.now()
        if exists:
            await conn.execute(
                update(s)
                .where(s.c.subscriber_eid == subscriber, s.c.target_eid == target)
                .values(state=state, updated_at=now)
            )
        else:
            await conn.execute(
                s.insert().values(subscriber_eid=subscriber, target_eid=target, state=state, updated_at=now)
            )
        return now

    async def request(self, caller: str, target: str) -> awareness_pb2.Subscription:
        check_other(caller, target, "target_eid")
        async with self._engine.begin() as conn:
            if await self._blocked(conn, caller, target):
                raise BimipError(grpc.StatusCode.PERMISSION_DENIED, "BLOCKED", "one of you blocks the other")
            row = await self._state(conn, caller, target)
            if row is not None and row.state in (PENDING, APPROVED):
                return _subscription(caller, target, row.state, row.updated_at)
            at = await self._put(conn, caller, target, PENDING, row is not None)
        await self._notify(caller, target, PENDING)
        return _subscription(caller, target, PENDING, at)

    async def answer(self, caller: str, subscriber: str, *, approve: bool) -> awareness_pb2.Subscription:
        """The target (caller) approves or denies `subscriber`'s request; denying also revokes."""
        check_other(caller, subscriber, "subscriber_eid")
        wanted = APPROVED if approve else DENIED
        async with self._engine.begin() as conn:
            row = await self._state(conn, subscriber, caller)
            if row is not None and row.state == wanted:
                return _subscription(subscriber, caller, wanted, row.updated_at)
            allowed = (PENDING,) if approve else (PENDING, APPROVED)
            if row is None or row.state not in allowed:
                raise BimipError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "NO_PENDING_REQUEST",
                    f"{subscriber} has no {'pending request' if approve else 'request or subscription'} "
                    "to you",
                )
            at = await self._put(conn, subscriber, caller, wanted, True)
        await self._notify(subscriber, caller, wanted)
        return _subscription(subscriber, caller, wanted, at)

    async def unsubscribe(self, caller: str, target: str) -> None:
        check_other(caller, target, "target_eid")
        async with self._engine.begin() as conn:
            row = await self._state(conn, caller, target)
            ended = row is not None and row.state in (PENDING, APPROVED)
            if ended:
                await self._put(conn, caller, target, REMOVED, True)
        if ended:
            await self._notify(caller, target, REMOVED)

    async def block(self, caller: str, other: str, *, blocked: bool) -> None:
        """Block (or unblock) `other`; messaging is told before the call returns."""
        check_other(caller, other, "eid")
        s, bl = store.subscriptions, store.blocks
        now = self._clock.now()
        async with self._engine.begin() as conn:
            if blocked:
                exists = (
                    await conn.execute(
                        select(bl.c.blocker_eid).where(bl.c.blocker_eid == caller, bl.c.blocked_eid == other)
                    )
                ).first()
                if exists is None:
                    await conn.execute(
                        bl.insert().values(blocker_eid=caller, blocked_eid=other, created_at=now)
                    )
                # Both directions end, pending requests included; an unblock does not restore them.
                await conn.execute(
                    update(s)
                    .where(
                        or_(
                            and_(s.c.subscriber_eid == caller, s.c.target_eid == other),
                            and_(s.c.subscriber_eid == other, s.c.target_eid == caller),
                        ),
                        s.c.state.in_((PENDING, APPROVED)),
                    )
                    .values(state=REMOVED, updated_at=now)
                )
            else:
                await conn.execute(delete(bl).where(bl.c.blocker_eid == caller, bl.c.blocked_eid == other))
        if blocked:
            await self._notify(caller, other, REMOVED)
            await self._notify(other, caller, REMOVED)
        # After the commit: a retry of the same call sends it again (both sides are idempotent).
        await self._link.send(
            block_change=internal_pb2.BlockChange(blocker_eid=caller, blocked_eid=other, blocked=blocked)
        )

    async def list(self, caller: str) -> awareness_pb2.ListSubscriptionsResponse:
        s, bl = store.subscriptions, store.blocks
        response = awareness_pb2.ListSubscriptionsResponse()
        async with self._engine.connect() as conn:
            for row in await conn.execute(
                select(s)
                .where(s.c.subscriber_eid == caller, s.c.state.in_((PENDING, APPROVED, DENIED)))
                .order_by(s.c.target_eid)
            ):
                response.subscriptions.append(
                    _subscription(caller, row.target_eid, row.state, row.updated_at)
                )
            for row in await conn.execute(
                select(s)
                .where(s.c.target_eid == caller, s.c.state.in_((PENDING, APPROVED)))
                .order_by(s.c.subscriber_eid)
            ):
                response.subscribers.append(
                    _subscription(row.subscriber_eid, caller, row.state, row.updated_at)
                )
            for row in await conn.execute(
                select(bl.c.blocked_eid).where(bl.c.blocker_eid == caller).order_by(bl.c.blocked_eid)
            ):
                response.blocked_eids.append(row.blocked_eid)
        return response

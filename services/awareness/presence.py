"""Presence, intent, visibility and activity (SPEC A1–A5, A7, A8).

- Which devices of a user are online is shared by every replica: a Redis hash per user, or a dict
  in process for the embedded default (`DeviceRegistry`). A device is online while it has an open
  stream; an entry names the stream that holds it, so a replaced stream's exit changes nothing.
- A user's intent, visibility and last-seen time are rows of `awareness_users`.
- The visible presence (A1) is computed from both and published on `aw-presence:{eid}` when an
  event changes it; the streams of that user's approved subscribers deliver it.
- Events for a user's own devices and activities aimed at a user go on `aw-user:{eid}` (JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.core.clock import Clock, timestamp
from bimip.core.metrics import Metrics
from bimip.core.pubsub import Bus
from bimip.core.storage import dialect_insert
from services.awareness import store

ONLINE, OFFLINE = aw.STATUS_ONLINE, aw.STATUS_OFFLINE
INTENTS = (aw.STATUS_AWAY, aw.STATUS_BUSY, aw.STATUS_DND)


def presence_channel(eid: str) -> str:
    return f"aw-presence:{eid}"


def user_channel(eid: str) -> str:
    return f"aw-user:{eid}"


class DeviceRegistry(Protocol):
    """Which devices are online, each held by one stream, each with a liveness deadline (A5)."""

    async def add(self, eid: str, device_id: str, sid: str, deadline: float) -> int:
        """Mark the device online, held by stream `sid`; returns how many devices were online before
        (the same device under an older stream included: a replacement is no change, A5)."""
        ...

    async def refresh(self, eid: str, device_id: str, sid: str, deadline: float) -> None:
        """A heartbeat: the device stays online until `deadline` (Unix seconds)."""
        ...

    async def remove(self, eid: str, device_id: str, sid: str) -> int | None:
        """Mark it offline if `sid` still holds it; returns how many remain, or None if it did not."""
        ...

    async def count(self, eid: str) -> int: ...

    async def expired(self, now: float) -> list[tuple[str, str, str]]:
        """Claim the (eid, device, sid) whose deadline passed; each is claimed by one replica only."""
        ...


def _member(eid: str, device_id: str, sid: str) -> str:
    return f"{eid}\n{device_id}\n{sid}"  # no id may hold a control character


class InProcessDevices:
    def __init__(self) -> None:
        self._online: dict[str, dict[str, str]] = {}
        self._deadlines: dict[tuple[str, str, str], float] = {}

    async def add(self, eid: str, device_id: str, sid: str, deadline: float) -> int:
        devices = self._online.setdefault(eid, {})
        before = len(devices)  # the same device under an older stream counts: a replacement is no change
        devices[device_id] = sid
        self._deadlines[(eid, device_id, sid)] = deadline
        return before

    async def refresh(self, eid: str, device_id: str, sid: str, deadline: float) -> None:
        if (eid, device_id, sid) in self._deadlines:
            self._deadlines[(eid, device_id, sid)] = deadline

    async def remove(self, eid: str, device_id: str, sid: str) -> int | None:
        self._deadlines.pop((eid, device_id, sid), None)
        devices = self._online.get(eid, {})
        if devices.get(device_id) != sid:
            return None
        del devices[device_id]
        if not devices:
            self._online.pop(eid, None)
        return len(devices)

    async def count(self, eid: str) -> int:
        return len(self._online.get(eid, {}))

    async def expired(self, now: float) -> list[tuple[str, str, str]]:
        gone = [key for key, deadline in self._deadlines.items() if deadline <= now]
        for key in gone:
            del self._deadlines[key]
        return gone


_REMOVE_IF_MINE = (
    "redis.call('zrem', KEYS[2], ARGV[3]) "
    "if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then "
    "redis.call('hdel', KEYS[1], ARGV[1]) return redis.call('hlen', KEYS[1]) end return -1"
)
_ADD = (
    "local n = redis.call('hlen', KEYS[1]) redis.call('hset', KEYS[1], ARGV[1], ARGV[2]) "
    "redis.call('zadd', KEYS[2], ARGV[4], ARGV[3]) return n"
)
_CLAIM = (
    "local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500) "
    "if #due > 0 then redis.call('zrem', KEYS[1], unpack(due)) end return due"
)


class RedisDevices:
    """A hash per user (device -> stream id) and one sorted set of deadlines that every replica's
    sweeper claims from, atomically, so a dead replica's devices go OFFLINE too (A5, A8)."""

    def __init__(self, client: Any, namespace: str) -> None:
        self._redis = client
        self._prefix = f"{namespace}:aw-devices:"
        self._deadlines = f"{namespace}:aw-deadlines"

    async def add(self, eid: str, device_id: str, sid: str, deadline: float) -> int:
        keys = (self._prefix + eid, self._deadlines)
        return int(
            await self._redis.eval(_ADD, 2, *keys, device_id, sid, _member(eid, device_id, sid), deadline)
        )

    async def refresh(self, eid: str, device_id: str, sid: str, deadline: float) -> None:
        await self._redis.zadd(self._deadlines, {_member(eid, device_id, sid): deadline}, xx=True)

    async def remove(self, eid: str, device_id: str, sid: str) -> int | None:
        keys = (self._prefix + eid, self._deadlines)
        member = _member(eid, device_id, sid)
        left = int(await self._redis.eval(_REMOVE_IF_MINE, 2, *keys, device_id, sid, member))
        return None if left < 0 else left

    async def count(self, eid: str) -> int:
        return int(await self._redis.hlen(self._prefix + eid))

    async def expired(self, now: float) -> list[tuple[str, str, str]]:
        due = await self._redis.eval(_CLAIM, 1, self._deadlines, now)
        claimed = []
        for member in due:
            eid, device_id, sid = (member.decode() if isinstance(member, bytes) else member).split("\n")
            claimed.append((eid, device_id, sid))
        return claimed


@dataclass(frozen=True)
class UserState:
    intent: int = 0
    hidden: bool = False
    last_seen_at: datetime | None = None


class Presence:
    """Computes and publishes users' visible presence."""

    def __init__(
        self,
        engine: AsyncEngine,
        writer: AsyncEngine,
        devices: DeviceRegistry,
        bus: Bus,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.writer = writer
        self.devices = devices
        self.bus = bus
        self.clock = clock
        published = (metrics or Metrics()).awareness_published
        self._published = {kind: published.labels(kind) for kind in ("presence", "intent", "visibility")}

    async def _publish(self, kind: str, channel: str, body: bytes) -> None:
        await self.bus.publish(channel, body)
        self._published[kind].inc()

    async def user(self, eid: str) -> UserState:
        u = store.users
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(u.c.intent, u.c.hidden, u.c.last_seen_at).where(u.c.eid == eid))
            ).first()
        return UserState(row.intent, row.hidden, row.last_seen_at) if row is not None else UserState()

    async def _save(self, eid: str, **values: Any) -> None:
        u = store.users
        insert = dialect_insert(self.writer, u)
        async with self.writer.begin() as conn:
            await conn.execute(
                insert.values(eid=eid, **values).on_conflict_do_update(index_elements=[u.c.eid], set_=values)
            )

    async def visible(
        self, eid: str, online: int | None = None, state: UserState | None = None
    ) -> aw.Presence:
        """A1, A7: OFFLINE (with last seen) when no device is online, else the intent, else ONLINE;
        a hidden user is OFFLINE without last seen."""
        state = state or await self.user(eid)
        online = await self.devices.count(eid) if online is None else online
        presence = aw.Presence(eid=eid, changed_at=timestamp(self.clock.now()))
        if state.hidden:
            presence.status = OFFLINE
        elif online == 0:
            presence.status = OFFLINE
            if state.last_seen_at is not None:
                presence.last_seen.CopyFrom(timestamp(state.last_seen_at))
        else:
            presence.status = aw.Status.ValueType(state.intent or ONLINE)
        return presence

    async def _publish_if_changed(self, before: aw.Presence, after: aw.Presence) -> None:
        if (before.status, before.HasField("last_seen")) != (after.status, after.HasField("last_seen")):
            await self._publish("presence", presence_channel(after.eid), after.SerializeToString())

    async def device_online(self, eid: str, device_id: str, sid: str, deadline: float) -> None:
        state = await self.user(eid)
        before = await self.devices.add(eid, device_id, sid, deadline)
        if before == 0:
            await self._publish_if_changed(
                await self.visible(eid, 0, state), await self.visible(eid, 1, state)
            )

    async def device_offline(self, eid: str, device_id: str, sid: str) -> None:
        left = await self.devices.remove(eid, device_id, sid)
        if left != 0:
            return  # still online elsewhere, or replaced by a newer stream: no change (A5, M7)
        state = await self.user(eid)
        now = self.clock.now()
        await self._save(eid, last_seen_at=now)
        after = UserState(state.intent, state.hidden, now)
        await self._publish_if_changed(await self.visible(eid, 1, state), await self.visible(eid, 0, after))

    async def set_intent(self, eid: str, intent: int, by: tuple[str, str]) -> None:
        state = await self.user(eid)
        value = 0 if intent == ONLINE else intent
        await self._save(eid, intent=value)
        after = UserState(value, state.hidden, state.last_seen_at)
        online = await self.devices.count(eid)
        await self._publish(
            "intent",
            user_channel(eid),
            json.dumps({"t": "intent", "intent": value or ONLINE, "by": by}).encode(),
        )
        await self._publish_if_changed(
            await self.visible(eid, online, state), await self.visible(eid, online, after)
        )

    async def set_hidden(self, eid: str, hidden: bool, by: tuple[str, str]) -> None:
        state = await self.user(eid)
        await self._save(eid, hidden=hidden)
        after = UserState(state.intent, hidden, state.last_seen_at)
        online = await self.devices.count(eid)
        await self._publish(
            "visibility",
            user_channel(eid),
            json.dumps({"t": "visibility", "hidden": hidden, "by": by}).encode(),
        )
        before, now_visible = await self.visible(eid, online, state), await self.visible(eid, online, after)
        if state.hidden != hidden:
            # Unhiding is a visible change even when the status stays OFFLINE: the last seen returns.
            await self._publish("presence", presence_channel(eid), now_visible.SerializeToString())
        else:
            await self._publish_if_changed(before, now_visible)

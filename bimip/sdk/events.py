"""What `Client.events()` yields.

- Entry events, one per entry of the user's log, each with its log offset: the SDK hands each
  offset to the application once, and acks it after the application's handler returns.
- Awareness events (presence, activity, intent, visibility, subscriptions): live state, not in the
  log, never acked.
- `SnapshotLoaded` when the device's position was reset to a snapshot, and `ConnectionChanged`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.common.v1 import common_pb2
from bimip.sync.v1 import sync_pb2


@dataclass(frozen=True)
class MessageReceived:
    """A message from another user (or addressed to this user by one)."""

    offset: int
    peer: str  # the other user of the conversation
    message: common_pb2.Message


@dataclass(frozen=True)
class MessageMirrored:
    """A message this user sent from another of their devices."""

    offset: int
    peer: str  # the other user of the conversation
    message: common_pb2.Message


@dataclass(frozen=True)
class ReceiptUpdated:
    """A message's aggregate status rose (DELIVERED, READ, PLAYED); per-device detail by query."""

    offset: int
    peer: str
    receipt: common_pb2.Receipt


@dataclass(frozen=True)
class MessageEdited:
    offset: int
    peer: str
    command: common_pb2.Command


@dataclass(frozen=True)
class MessageDeleted:
    offset: int
    peer: str
    command: common_pb2.Command
    for_everyone: bool


@dataclass(frozen=True)
class PresenceChanged:
    """A user this user is subscribed to: ONLINE, AWAY, BUSY, DND, or OFFLINE with `last_seen`
    (None when hidden). Sent for every such user when the awareness stream opens, then on each
    change."""

    eid: str
    status: aw.Status.ValueType
    last_seen: datetime | None
    changed_at: datetime | None


@dataclass(frozen=True)
class ActivityChanged:
    """A peer's activity aimed at this user: TYPING or RECORDING until `expires_at`, or PAUSED
    (stopped, or expired)."""

    eid: str
    device_id: str
    status: aw.Status.ValueType
    expires_at: datetime | None


@dataclass(frozen=True)
class IntentChanged:
    """This user's intent (AWAY, BUSY, DND; ONLINE when cleared), set on `set_by` device."""

    intent: aw.Status.ValueType
    set_by: str


@dataclass(frozen=True)
class VisibilityChanged:
    """This user's presence was hidden or shown, from `set_by` device."""

    hidden: bool
    set_by: str


@dataclass(frozen=True)
class SubscriptionChanged:
    """A subscription involving this user changed (requested, approved, denied, removed)."""

    subscription: aw.Subscription


@dataclass(frozen=True)
class SnapshotLoaded:
    """The server's log no longer covers this device's position (the log was compacted or
    reset), so the device now stands at the snapshot's version: replace the conversation list
    with `snapshot.conversations`; entries after it follow as usual."""

    snapshot: sync_pb2.Snapshot


@dataclass(frozen=True)
class ConnectionChanged:
    """A stream's connection: `connected`, `reconnecting` (backing off after a failure, with the
    error), or `closed`. `service` is `messaging` or `awareness`."""

    state: Literal["connected", "reconnecting", "closed"]
    error: str = ""
    service: str = "messaging"


EntryEvent = MessageReceived | MessageMirrored | ReceiptUpdated | MessageEdited | MessageDeleted
AwarenessEvent = PresenceChanged | ActivityChanged | IntentChanged | VisibilityChanged | SubscriptionChanged
Event = EntryEvent | AwarenessEvent | SnapshotLoaded | ConnectionChanged


def _time(ts: Timestamp) -> datetime | None:
    return ts.ToDatetime().astimezone() if ts.seconds or ts.nanos else None


def awareness_event(frame: aw.ConnectResponse) -> AwarenessEvent | None:
    """The event for one frame of the awareness stream; None for frames that are not events."""
    kind = frame.WhichOneof("frame")
    if kind == "presence":
        p = frame.presence
        return PresenceChanged(p.eid, p.status, _time(p.last_seen), _time(p.changed_at))
    if kind == "activity":
        a = frame.activity
        return ActivityChanged(a.by.eid, a.by.device_id, a.status, _time(a.expires_at))
    if kind == "intent":
        return IntentChanged(frame.intent.intent, frame.intent.set_by.device_id)
    if kind == "visibility":
        return VisibilityChanged(frame.visibility.hidden, frame.visibility.set_by.device_id)
    if kind == "subscription":
        return SubscriptionChanged(frame.subscription.subscription)
    return None


def as_entry(event: EntryEvent) -> common_pb2.Entry:
    """The log entry an entry event was made from (without its author and creation time)."""
    entry = common_pb2.Entry(offset=event.offset, peer_eid=event.peer)
    if isinstance(event, MessageReceived | MessageMirrored):
        entry.message.CopyFrom(event.message)
    elif isinstance(event, ReceiptUpdated):
        entry.receipt.CopyFrom(event.receipt)
    else:
        entry.command.CopyFrom(event.command)
    return entry


def entry_event(entry: common_pb2.Entry, me: str) -> EntryEvent | None:
    """The event for one log entry as seen by user `me`; None for an entry with no body."""
    kind = entry.WhichOneof("body")
    if kind == "message":
        if entry.message.sender.eid == me:
            return MessageMirrored(entry.offset, entry.peer_eid, entry.message)
        return MessageReceived(entry.offset, entry.peer_eid, entry.message)
    if kind == "receipt":
        return ReceiptUpdated(entry.offset, entry.peer_eid, entry.receipt)
    if kind == "command":
        if entry.command.kind == common_pb2.COMMAND_KIND_EDIT:
            return MessageEdited(entry.offset, entry.peer_eid, entry.command)
        everyone = entry.command.kind == common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE
        return MessageDeleted(entry.offset, entry.peer_eid, entry.command, everyone)
    return None

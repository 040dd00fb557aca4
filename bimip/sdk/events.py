"""What `Client.events()` yields: one typed event per entry of the user's log, plus connection
state. Each entry event carries its log offset; the SDK hands each offset to the application once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bimip.common.v1 import common_pb2


@dataclass(frozen=True)
class MessageReceived:
    """A message from another user (or addressed to this user by one)."""

    offset: int
    message: common_pb2.Message


@dataclass(frozen=True)
class MessageMirrored:
    """A message this user sent from another of their devices."""

    offset: int
    message: common_pb2.Message


@dataclass(frozen=True)
class ReceiptUpdated:
    """A message's aggregate status rose (DELIVERED, READ, PLAYED); per-device detail by query."""

    offset: int
    receipt: common_pb2.Receipt


@dataclass(frozen=True)
class MessageEdited:
    offset: int
    command: common_pb2.Command


@dataclass(frozen=True)
class MessageDeleted:
    offset: int
    command: common_pb2.Command
    for_everyone: bool


@dataclass(frozen=True)
class ConnectionChanged:
    """The SDK's connection: `connected` (streams open), `reconnecting` (backing off after a
    failure, with the error), or `closed`."""

    state: Literal["connected", "reconnecting", "closed"]
    error: str = ""


EntryEvent = MessageReceived | MessageMirrored | ReceiptUpdated | MessageEdited | MessageDeleted
Event = EntryEvent | ConnectionChanged


def entry_event(entry: common_pb2.Entry, me: str) -> EntryEvent | None:
    """The event for one log entry as seen by user `me`; None for an entry with no body."""
    kind = entry.WhichOneof("body")
    if kind == "message":
        if entry.message.sender.eid == me:
            return MessageMirrored(entry.offset, entry.message)
        return MessageReceived(entry.offset, entry.message)
    if kind == "receipt":
        return ReceiptUpdated(entry.offset, entry.receipt)
    if kind == "command":
        if entry.command.kind == common_pb2.COMMAND_KIND_EDIT:
            return MessageEdited(entry.offset, entry.command)
        everyone = entry.command.kind == common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE
        return MessageDeleted(entry.offset, entry.command, everyone)
    return None

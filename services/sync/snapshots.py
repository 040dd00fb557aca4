"""A user's snapshot (SPEC S3): the log folded into one summary per conversation.

`Fold` is a pure function of the entries 1..version of the user's log, so two devices at the same
version see the same snapshot. Its state is JSON (entries as base64 of their protobuf bytes) and is
stored with each snapshot, so a later snapshot continues from the latest checkpoint below it
instead of from offset 1.

Per conversation (the entry's peer) the fold keeps the visible messages (edits applied, deletes
removed), the read position (the offset of the latest received message the user has read: READ
receipts in the user's own log), and the aggregate status of each sent message (receipts in the
sender's log). Unread = visible received messages after the read position.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from bimip.common.v1 import common_pb2
from bimip.sync.v1 import sync_pb2

READ = common_pb2.DELIVERY_STATUS_READ
SENT = common_pb2.DELIVERY_STATUS_SENT
DELIVERED = common_pb2.DELIVERY_STATUS_DELIVERED
EDIT = common_pb2.COMMAND_KIND_EDIT


@dataclass
class Conversation:
    visible: dict[str, list[Any]] = field(default_factory=dict)  # signal_id -> [offset, received, b64 entry]
    edits: dict[str, list[Any]] = field(default_factory=dict)  # signal_id -> [wall_ms, counter, device]
    statuses: dict[str, int] = field(default_factory=dict)  # sent signal_id -> aggregate status
    gone: list[str] = field(default_factory=list)  # deleted signal_ids
    read_upto: int = 0

    def summary(self, peer: str) -> sync_pb2.ConversationSummary:
        summary = sync_pb2.ConversationSummary(peer_eid=peer)
        summary.unread_count = sum(
            1 for o, received, _ in self.visible.values() if received and o > self.read_upto
        )
        if self.visible:
            signal_id, (offset, received, body) = max(self.visible.items(), key=lambda item: item[1][0])
            summary.last_entry.ParseFromString(base64.b64decode(body))
            if received:
                summary.last_status = READ if offset <= self.read_upto else DELIVERED
            else:
                summary.last_status = self.statuses.get(signal_id, SENT)  # type: ignore[assignment]
        return summary


@dataclass
class Fold:
    eid: str
    version: int = 0
    conversations: dict[str, Conversation] = field(default_factory=dict)

    # --- applying entries ---

    def apply(self, entry: common_pb2.Entry) -> None:
        """Fold one entry in; entries must come in offset order, each once."""
        if entry.offset <= self.version:
            return
        self.version = entry.offset
        conversation = self.conversations.setdefault(entry.peer_eid, Conversation())
        kind = entry.WhichOneof("body")
        if kind == "message":
            self._message(conversation, entry)
        elif kind == "receipt":
            self._receipt(conversation, entry.receipt)
        elif kind == "command":
            self._command(conversation, entry)

    def _message(self, c: Conversation, entry: common_pb2.Entry) -> None:
        signal_id = entry.message.signal_id
        if signal_id in c.gone:
            return
        received = entry.message.sender.eid != self.eid
        c.visible[signal_id] = [entry.offset, received, _b64(entry)]
        if not received:
            c.statuses.setdefault(signal_id, SENT)

    def _receipt(self, c: Conversation, receipt: common_pb2.Receipt) -> None:
        message = c.visible.get(receipt.signal_id)
        if message is None:
            return
        offset, received, _ = message
        if received:
            if receipt.status >= READ:
                c.read_upto = max(c.read_upto, offset)
        else:
            c.statuses[receipt.signal_id] = max(c.statuses.get(receipt.signal_id, SENT), receipt.status)

    def _command(self, c: Conversation, entry: common_pb2.Entry) -> None:
        command = entry.command
        signal_id = command.signal_id
        message = c.visible.get(signal_id)
        if message is None:
            return
        if command.kind == EDIT:
            clock = [command.clock.wall_time_ms, command.clock.counter, entry.author.device_id]
            if signal_id in c.edits and c.edits[signal_id] >= clock:
                return  # M9: last writer wins by (clock, device id)
            c.edits[signal_id] = clock
            edited = common_pb2.Entry.FromString(base64.b64decode(message[2]))
            for name in ("payload", "encryption_type", "encrypted", "signature"):
                setattr(edited.message, name, getattr(command, name))
            message[2] = _b64(edited)
        else:  # deleted for everyone, or for this user only: gone from this user's view either way
            del c.visible[signal_id]
            c.edits.pop(signal_id, None)
            c.statuses.pop(signal_id, None)
            c.gone.append(signal_id)

    # --- the snapshot ---

    def summaries(self) -> list[sync_pb2.ConversationSummary]:
        return [self.conversations[peer].summary(peer) for peer in sorted(self.conversations)]

    def checksum(self) -> bytes:
        """SHA-256 over the version and each summary (sorted by peer), length-prefixed."""
        h = hashlib.sha256(self.version.to_bytes(8, "big"))
        for summary in self.summaries():
            body = summary.SerializeToString(deterministic=True)
            h.update(len(body).to_bytes(4, "big") + body)
        return h.digest()

    # --- storage ---

    def dump(self) -> bytes:
        conversations = {
            peer: {
                "visible": c.visible,
                "edits": c.edits,
                "statuses": c.statuses,
                "gone": c.gone,
                "read_upto": c.read_upto,
            }
            for peer, c in self.conversations.items()
        }
        return json.dumps({"eid": self.eid, "version": self.version, "conversations": conversations}).encode()

    @classmethod
    def load(cls, data: bytes) -> Fold:
        raw = json.loads(data)
        conversations = {peer: Conversation(**c) for peer, c in raw["conversations"].items()}
        return cls(raw["eid"], raw["version"], conversations)


def _b64(entry: common_pb2.Entry) -> str:
    return base64.b64encode(entry.SerializeToString(deterministic=True)).decode()

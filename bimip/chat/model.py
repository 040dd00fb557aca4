"""The terminal chat's state and its rendering, kept free of I/O: one conversation with one peer,
folded from log entries (history from the SDK's local copy, live events) and awareness events."""

from __future__ import annotations

import textwrap
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.common.v1 import common_pb2
from bimip.sdk import ActivityChanged, EntryEvent, Event, PresenceChanged, SendResult
from bimip.sdk.events import as_entry

SENT, DELIVERED = common_pb2.DELIVERY_STATUS_SENT, common_pb2.DELIVERY_STATUS_DELIVERED
READ, PLAYED = common_pb2.DELIVERY_STATUS_READ, common_pb2.DELIVERY_STATUS_PLAYED

BOLD, DIM, REVERSE, BLUE, RESET = "\x1b[1m", "\x1b[2m", "\x1b[7m", "\x1b[34m", "\x1b[0m"
PENDING_TICK, SENT_TICK, DELIVERED_TICK = "◷", "✓", "✓✓"

PRESENCE_WORDS = {
    aw.STATUS_ONLINE: "online",
    aw.STATUS_AWAY: "away",
    aw.STATUS_BUSY: "busy",
    aw.STATUS_DND: "do not disturb",
    aw.STATUS_OFFLINE: "offline",
}


@dataclass
class Line:
    """One message of the conversation."""

    key: str  # the signal id; the client id until the server acknowledges it
    offset: int  # 0 while waiting in the outbox
    mine: bool
    text: str
    at: datetime
    status: int = 0  # 0 = not yet SENT, else the aggregate delivery status
    edited: bool = False
    deleted: bool = False


def _time(message: common_pb2.Message, entry: common_pb2.Entry | None = None) -> datetime:
    for ts in (message.server_time, entry.created_at if entry else None, message.client_time):
        if ts is not None and (ts.seconds or ts.nanos):
            return ts.ToDatetime().astimezone()
    return datetime.now().astimezone()


class Conversation:
    """Everything the chat shows about the conversation between `me` and `peer`."""

    def __init__(self, me: str, device: str, peer: str) -> None:
        self.me, self.device, self.peer = me, device, peer
        self.lines: dict[str, Line] = {}
        self.presence: PresenceChanged | None = None
        self.typing = 0  # the peer's activity: 0, TYPING or RECORDING
        self.notices: deque[str] = deque(maxlen=3)
        self._pending_order = 0

    # --- folding ---

    def entry(self, entry: common_pb2.Entry) -> bool:
        """Fold one log entry in; True if the conversation changed."""
        if entry.peer_eid != self.peer:
            return False
        kind = entry.WhichOneof("body")
        if kind == "message":
            m = entry.message
            line = self.lines.get(m.signal_id) or self.lines.pop(m.client_id, None)
            if line is None:
                line = Line(
                    m.signal_id, entry.offset, m.sender.eid == self.me, _text(m.payload), _time(m, entry)
                )
            line.key, line.offset = m.signal_id, entry.offset
            if line.mine:
                line.status = max(line.status, SENT)
            else:
                self.typing = 0  # their message is what they were typing
            self.lines[m.signal_id] = line
            return True
        if kind == "receipt":
            line = self.lines.get(entry.receipt.signal_id)
            if line is None:
                return False
            line.status = max(line.status, entry.receipt.status)
            return True
        if kind == "command":
            line = self.lines.get(entry.command.signal_id)
            if line is None or line.deleted:
                return False
            kind_ = entry.command.kind
            if kind_ == common_pb2.COMMAND_KIND_EDIT:
                line.text, line.edited = _text(entry.command.payload), True
            else:
                line.deleted = True
            return True
        return False

    def event(self, event: Event) -> bool:
        """Fold one SDK event in; True if the view changed."""
        if isinstance(event, EntryEvent):
            return self.entry(as_entry(event))
        if isinstance(event, PresenceChanged) and event.eid == self.peer:
            self.presence = event
            return True
        if isinstance(event, ActivityChanged) and event.eid == self.peer:
            self.typing = 0 if event.status == aw.STATUS_PAUSED else event.status
            return True
        return False

    def pending(self, client_id: str, text: str) -> None:
        """A message this device is sending (in the outbox until SENT)."""
        self._pending_order += 1
        self.lines[client_id] = Line(client_id, 0, True, text, datetime.now().astimezone())

    def sent(self, client_id: str, result: SendResult) -> None:
        line = self.lines.pop(client_id, None) or self.lines.get(result.signal_id)
        if line is None:
            return
        line.key, line.offset = result.signal_id, result.offset
        line.status = max(line.status, SENT)
        self.lines[result.signal_id] = line

    def refused(self, client_id: str, why: str) -> None:
        self.lines.pop(client_id, None)
        self.notices.append(f"not sent: {why}")

    def ordered(self) -> list[Line]:
        sent = sorted((line for line in self.lines.values() if line.offset), key=lambda line: line.offset)
        waiting = [line for line in self.lines.values() if not line.offset]
        return sent + waiting

    def last_received(self) -> Line | None:
        received = [line for line in self.ordered() if not line.mine and line.offset]
        return received[-1] if received else None

    # --- rendering ---

    def presence_text(self) -> str:
        p = self.presence
        if p is None:
            return "presence not shared (yet)"
        word = PRESENCE_WORDS.get(p.status, "?")
        if p.status == aw.STATUS_OFFLINE and p.last_seen is not None:
            return f"{word}, last seen {p.last_seen:%H:%M}"
        return word

    def render(self, draft: str, width: int, height: int, *, color: bool = True) -> list[str]:
        """The screen: a header, the latest messages, the peer's activity, the input line."""
        width = max(width, 20)
        style = (lambda code, text: f"{code}{text}{RESET}") if color else (lambda code, text: text)
        header = f" {self.me} ({self.device}) ⇄ {self.peer} · {self.presence_text()} "
        rows: list[str] = []
        for line in self.ordered():
            rows.extend(self._message_rows(line, width, style))
        activity = "typing…" if self.typing == aw.STATUS_TYPING else ""
        activity = "recording…" if self.typing == aw.STATUS_RECORDING else activity
        footer = [
            style(DIM, f" {self.peer} is {activity}") if activity else "",
            "─" * width,
            f"> {draft}",
            *(style(DIM, notice) for notice in self.notices),
        ]
        room = max(height - 1 - len(footer), 1)
        body = rows[-room:]
        body = [""] * (room - len(body)) + body
        return [style(REVERSE, header[:width].ljust(width)), *body, *footer]

    def _message_rows(self, line: Line, width: int, style: object) -> list[str]:
        assert callable(style)
        who = "you" if line.mine else self.peer.split("@")[0]
        text = "(deleted)" if line.deleted else line.text + (" (edited)" if line.edited else "")
        prefix = f"{line.at:%H:%M} {who[:10]:<10} "
        ticks = ""
        if line.mine:
            if line.status >= READ:
                ticks = style(BOLD + BLUE, DELIVERED_TICK)
            elif line.status >= DELIVERED:
                ticks = DELIVERED_TICK
            elif line.status >= SENT:
                ticks = SENT_TICK
            else:
                ticks = PENDING_TICK
        wrapped = textwrap.wrap(text, max(width - len(prefix) - 4, 10)) or [""]
        rows = [prefix + wrapped[0]] + [" " * len(prefix) + more for more in wrapped[1:]]
        if ticks:
            rows[-1] = f"{rows[-1]} {ticks}"
        return rows


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", errors="replace").replace("\n", " ")

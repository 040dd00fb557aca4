"""`bimip chat`: a terminal chat on the SDK, one conversation at a time.

On a terminal it draws a full-screen view (alternate screen, redrawn on every change) and reads
keys one by one, so the peer sees "typing…" while a line is being written. With stdin or stdout
not a terminal it prints each new or changed line instead, which keeps it usable in a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
import tty
import uuid
from typing import TextIO

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.chat.model import Conversation
from bimip.sdk import (
    BimipClientError,
    Client,
    ConnectionChanged,
    Event,
    MessageReceived,
    SubscriptionChanged,
)

PENDING_SUBSCRIPTION = aw.SUBSCRIPTION_STATE_PENDING
TYPING_REFRESH_S = 2.5  # re-send TYPING while the draft keeps changing (it expires after 6 s)
HISTORY = 200
DRAIN_S = 10.0  # at the end of piped input, how long to wait for unsent messages
HELP = "/with EID · /away /busy /dnd /online · /hide /show · /quit (or Ctrl-D)"
INTENTS = {
    "/away": aw.STATUS_AWAY,
    "/busy": aw.STATUS_BUSY,
    "/dnd": aw.STATUS_DND,
    "/online": aw.STATUS_ONLINE,
}
ALT_ON, ALT_OFF, HOME_CLEAR = "\x1b[?1049h", "\x1b[?1049l", "\x1b[H\x1b[2J"


class ChatApp:
    def __init__(self, client: Client, peer: str | None, out: TextIO, *, screen: bool) -> None:
        self.client = client
        self.out = out
        self.screen = screen
        self.draft = ""
        self.conversation = Conversation(client.eid, client.device_id, peer or "")
        self._done = asyncio.Event()
        self._redraw_due = False
        self._printed: set[str] = set()
        self._typing_sent = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._escape = ""
        self._sending = 0
        self._all_sent = asyncio.Event()
        self._all_sent.set()

    # --- running ---

    async def run(self, stdin: int) -> None:
        if self.conversation.peer:
            await self.open(self.conversation.peer)
        else:
            self.notice(f"no conversation yet: type /with EID to start one ({HELP})")
        consumer = asyncio.create_task(self._consume())
        self.spawn(self._sync())
        loop = asyncio.get_running_loop()
        loop.add_reader(stdin, self._on_input, stdin)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGWINCH, self.redraw)
        try:
            self.redraw()
            await self._done.wait()
        finally:
            self._draw()  # the last state, whatever redraw was still due
            loop.remove_reader(stdin)
            consumer.cancel()
            for task in [consumer, *self._tasks]:
                task.cancel()
            await asyncio.gather(consumer, *self._tasks, return_exceptions=True)

    def quit(self) -> None:
        self._done.set()

    async def _drain_then_quit(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_S):
                await self._all_sent.wait()
        self.quit()

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self) -> None:
        """History through sync: whatever this device has not seen yet arrives as events."""
        try:
            await self.client.sync()
        except BimipClientError as err:
            self.notice(f"sync: {err.reason or err.code.name}")

    async def open(self, peer: str) -> None:
        """Show the conversation with `peer`: its history, and its presence once shared."""
        self.conversation = Conversation(self.client.eid, self.client.device_id, peer)
        for entry in await self.client.history(peer, HISTORY):
            self.conversation.entry(entry)
        if (p := self.client.presences.get(peer)) is not None:
            self.conversation.presence = p
        self.spawn(self._share_presence(peer))
        self._mark_read()
        self.redraw()

    async def _share_presence(self, peer: str) -> None:
        """Ask to see the peer's presence, and let a peer who asked see ours: opening a
        conversation with someone is taken as consent."""
        try:
            await self.client.subscribe(peer)
            listing = await self.client.subscriptions()
            if any(s.subscriber_eid == peer and s.state == PENDING_SUBSCRIPTION for s in listing.subscribers):
                await self.client.approve(peer)
        except BimipClientError as err:
            self.notice(f"presence: {err.reason or err.code.name}")

    async def _consume(self) -> None:
        async for event in self.client.events():
            self._event(event)

    def _event(self, event: Event) -> None:
        c = self.conversation
        if isinstance(event, MessageReceived) and not c.peer:
            self.spawn(self.open(event.peer))
        changed = c.event(event)
        if isinstance(event, MessageReceived) and event.peer == c.peer:
            self._mark_read()
        elif isinstance(event, SubscriptionChanged):
            s = event.subscription
            if (
                s.target_eid == self.client.eid
                and s.subscriber_eid == c.peer
                and s.state == PENDING_SUBSCRIPTION
            ):
                self.spawn(self._share_presence(c.peer))
        elif isinstance(event, ConnectionChanged) and event.state != "connected":
            self.notice(f"{event.service}: {event.state} ({event.error})" if event.error else event.state)
            changed = True
        elif isinstance(event, ConnectionChanged):
            self.notice(f"{event.service}: connected")
            if event.service == "awareness" and c.peer:  # (again) after a failure or a restart
                self.spawn(self._share_presence(c.peer))
            changed = True
        if changed:
            self.redraw()

    def _mark_read(self) -> None:
        last = self.conversation.last_received()
        if last is not None:
            self.spawn(self._quietly(self.client.mark_read_until(self.conversation.peer, last.offset)))

    async def _quietly(self, call: object) -> None:
        try:
            await call  # type: ignore[misc]
        except BimipClientError as err:
            if err.reason != "OFFLINE":
                self.notice(f"{err.reason or err.code.name}: {err.message}")

    def notice(self, text: str) -> None:
        self.conversation.notices.append(text)
        self.redraw()

    # --- input ---

    def _on_input(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:  # end of input: quit once what was written has gone out
            asyncio.get_running_loop().remove_reader(fd)
            self.spawn(self._drain_then_quit())
            return
        for ch in data.decode("utf-8", errors="ignore"):
            self._key(ch)
        self._draft_changed()
        self.redraw()

    def _key(self, ch: str) -> None:
        if self._escape:  # skip escape sequences (arrow keys and the like)
            self._escape += ch
            if len(self._escape) > 1 and (ch.isalpha() or ch == "~"):
                self._escape = ""
            return
        if ch == "\x1b":
            self._escape = ch
        elif ch in "\r\n":
            text, self.draft = self.draft.strip(), ""
            if text:
                self._submit(text)
        elif ch in "\x7f\x08":
            self.draft = self.draft[:-1]
        elif ch == "\x04" and not self.draft:  # Ctrl-D
            self.quit()
        elif ch == "\x15":  # Ctrl-U
            self.draft = ""
        elif ch.isprintable():
            self.draft += ch

    def _draft_changed(self) -> None:
        peer = self.conversation.peer
        if not peer or self.draft.startswith("/"):
            return
        now = time.monotonic()
        if self.draft and now - self._typing_sent > TYPING_REFRESH_S:
            self._typing_sent = now
            self.spawn(self._quietly(self.client.typing(peer)))
        elif not self.draft and self._typing_sent:
            self._typing_sent = 0.0
            self.spawn(self._quietly(self.client.stop_activity(peer)))

    def _submit(self, text: str) -> None:
        if text.startswith("/"):
            self._command(text)
            return
        peer = self.conversation.peer
        if not peer:
            self.notice("no conversation: /with EID first")
            return
        client_id = uuid.uuid4().hex
        self.conversation.pending(client_id, text)
        self.spawn(self._send(peer, client_id, text))

    async def _send(self, peer: str, client_id: str, text: str) -> None:
        self._sending += 1
        self._all_sent.clear()
        try:
            result = await self.client.send(peer, text.encode(), client_id=client_id)
        except BimipClientError as err:
            if err.reason != "CLIENT_CLOSED":
                self.conversation.refused(client_id, err.reason or err.code.name)
        else:
            if peer == self.conversation.peer:
                self.conversation.sent(client_id, result)
        finally:
            self._sending -= 1
            if not self._sending:
                self._all_sent.set()
        self.redraw()

    def _command(self, text: str) -> None:
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            self.quit()
        elif name == "/with" and arg.strip():
            self.spawn(self.open(arg.strip()))
        elif name in INTENTS:
            self.spawn(self._quietly(self.client.set_intent(INTENTS[name])))
            self.notice(f"you are {name[1:]}")
        elif name in ("/hide", "/show"):
            self.spawn(self._quietly(self.client.set_visibility(name == "/hide")))
            self.notice("your presence is hidden" if name == "/hide" else "your presence is shown")
        else:
            self.notice(HELP)

    # --- output ---

    def redraw(self) -> None:
        if not self._redraw_due:
            self._redraw_due = True
            asyncio.get_running_loop().call_soon(self._draw)

    def _draw(self) -> None:
        self._redraw_due = False
        if self.screen:
            size = os.get_terminal_size(self.out.fileno())
            rows = self.conversation.render(self.draft, size.columns, size.lines)
            self.out.write(HOME_CLEAR + "\r\n".join(rows))
        else:
            rows = self.conversation.render(self.draft, 100, 40, color=False)
            for row in rows[1:]:  # not the header, the rule or the input line
                if row.strip() and not row.startswith(("─", "> ")) and row not in self._printed:
                    self._printed.add(row)
                    self.out.write(row + "\n")
        self.out.flush()


def run(client: Client, peer: str | None) -> int:
    """Run the chat on this process's terminal (or pipes) until /quit, Ctrl-D or Ctrl-C."""
    stdin, out = sys.stdin.fileno(), sys.stdout
    screen = os.isatty(stdin) and out.isatty()
    saved = termios.tcgetattr(stdin) if screen else None

    async def main() -> None:
        async with client:
            app = ChatApp(client, peer, out, screen=screen)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, app.quit)
            await app.run(stdin)

    failure: BimipClientError | None = None
    try:
        if screen:
            tty.setcbreak(stdin)
            out.write(ALT_ON)
        asyncio.run(main())
    except BimipClientError as err:
        failure = err
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            out.write(ALT_OFF)
            out.flush()
    if failure is not None:
        print(f"bimip chat: {failure}", file=sys.stderr)
        return 1
    return 0

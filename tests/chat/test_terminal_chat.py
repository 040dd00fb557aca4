"""`bimip chat` driven as a person drives it: real terminals (tmux panes), keystrokes in, the screen
read back, two users and a second device of one of them, against real servers on both backends."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bimip.chat.model import Conversation
from bimip.common.v1 import common_pb2
from bimip.sdk import MessageReceived
from tests.conftest import Backend
from tests.helpers import eventually
from tests.processes import free_ports
from tests.sdk.apps import apps
from tests.suite import JWT_SECRET, Suite, running_suite

A, B = "alice@example.com", "bob@example.com"
READ_TICKS = re.compile(r"\x1b\[[0-9;]*34m(\x1b\[[0-9;]*m)*✓✓")  # blue, as tmux reports it


class Tmux:
    """A private tmux server; each chat runs in a pane of its own."""

    def __init__(self) -> None:
        self.socket = f"bimip-test-{uuid.uuid4().hex[:8]}"

    async def run(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "tmux", "-L", self.socket, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode == 0, f"tmux {args[0]}: {err.decode()}"
        return out.decode()

    async def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        line = f"env {exports} {' '.join(command)}; echo EXITED $?; sleep 60"
        await self.run("new-session", "-d", "-s", name, "-x", "100", "-y", "24", line)

    async def keys(self, name: str, *keys: str) -> None:
        await self.run("send-keys", "-t", name, *keys)

    async def type(self, name: str, text: str) -> None:
        await self.run("send-keys", "-t", name, "-l", text)

    async def screen(self, name: str, *, escapes: bool = False) -> str:
        return await self.run("capture-pane", "-p", *(["-e"] if escapes else []), "-t", name)

    async def shows(self, name: str, text: str) -> bool:
        return text in await self.screen(name)

    async def close(self) -> None:
        process = await asyncio.create_subprocess_exec(
            "tmux", "-L", self.socket, "kill-server", stderr=asyncio.subprocess.DEVNULL
        )
        await process.wait()


@pytest.fixture
async def tmux() -> AsyncIterator[Tmux]:
    if shutil.which("tmux") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is required to drive the terminal chat in CI")
        pytest.skip("tmux is not installed")
    t = Tmux()
    try:
        yield t
    finally:
        await t.close()


def chat(suite: Suite, tmp_path: Path, user: str, device: str, peer: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bimip.cli",
        "chat",
        f"--user={user}",
        f"--device={device}",
        f"--with={peer}",
        f"--store={tmp_path / f'{user}-{device}.db'}",
        f"--messaging={suite.address('messaging')}",
        f"--awareness={suite.address('awareness')}",
        f"--sync={suite.address('sync')}",
    ]


async def test_two_users_and_a_second_device_chat_in_terminals(
    backend: Backend, tmp_path: Path, tmux: Tmux
) -> None:
    ports = dict(
        zip(
            ("BIMIP_MESSAGING_PORT", "BIMIP_AWARENESS_PORT", "BIMIP_SYNC_PORT"),
            map(str, free_ports(3)),
            strict=True,
        )
    )
    async with running_suite(backend, tmp_path, **ports) as suite:
        env = {"BIMIP_JWT_SECRET": JWT_SECRET, "BIMIP_VAR_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
        await tmux.start("alice", chat(suite, tmp_path, A, "laptop", B), env)
        await tmux.start("bob", chat(suite, tmp_path, B, "phone", A), env)
        # Opening the conversation shares presence both ways: each sees the other online.
        await eventually(lambda: tmux.shows("alice", f"⇄ {B} · online"), timeout=30)
        await eventually(lambda: tmux.shows("bob", f"⇄ {A} · online"), timeout=30)

        await tmux.type("alice", "hello bo")
        await eventually(lambda: tmux.shows("bob", f"{A} is typing…"), timeout=15)
        await tmux.type("alice", "b")
        await tmux.keys("alice", "Enter")
        await eventually(lambda: tmux.shows("bob", "alice      hello bob"), timeout=15)
        await eventually(lambda: _not_shown(tmux, "bob", f"{A} is typing…"), timeout=15)  # sent: no typing
        # Bob's screen shows it, so it is read: Alice's ticks turn highlighted.
        await eventually(lambda: _read_ticks(tmux, "alice", "hello bob"), timeout=15)

        await tmux.type("bob", "hi alice")
        await tmux.keys("bob", "Enter")
        await eventually(lambda: tmux.shows("alice", "bob        hi alice"), timeout=15)

        # Alice's second device: the history comes through sync, her own message included.
        await tmux.start("tablet", chat(suite, tmp_path, A, "tablet", B), env)
        await eventually(lambda: tmux.shows("tablet", "bob        hi alice"), timeout=30)
        assert "you        hello bob" in await tmux.screen("tablet")
        await tmux.type("tablet", "from my tablet")
        await tmux.keys("tablet", "Enter")
        await eventually(lambda: tmux.shows("bob", "alice      from my tablet"), timeout=15)
        await eventually(lambda: tmux.shows("alice", "you        from my tablet"), timeout=15)  # mirrored

        await tmux.type("bob", "/quit")
        await tmux.keys("bob", "Enter")
        await eventually(lambda: tmux.shows("bob", "EXITED 0"), timeout=15)
        await eventually(lambda: tmux.shows("alice", f"⇄ {B} · offline, last seen"), timeout=30)


async def _not_shown(tmux: Tmux, name: str, text: str) -> bool:
    return text not in await tmux.screen(name)


async def _read_ticks(tmux: Tmux, name: str, text: str) -> bool:
    line = next((row for row in (await tmux.screen(name, escapes=True)).splitlines() if text in row), "")
    return bool(READ_TICKS.search(line))


def test_ticks_follow_the_aggregate_status() -> None:
    """The view's ticks: pending, SENT, DELIVERED and READ (highlighted)."""
    c = Conversation(A, "laptop", B)

    def row(*, color: bool = True) -> str:
        return next(r for r in c.render("", 60, 8, color=color) if " hi" in r)

    c.pending("c1", "hi")
    assert row(color=False).endswith("hi ◷")
    c.entry(
        common_pb2.Entry(
            offset=1,
            peer_eid=B,
            message=common_pb2.Message(client_id="c1", signal_id="s1", sender=common_pb2.Identity(eid=A)),
        )
    )
    assert row(color=False).endswith("hi ✓")
    for status, tail in (
        (common_pb2.DELIVERY_STATUS_DELIVERED, " ✓✓"),
        (common_pb2.DELIVERY_STATUS_READ, "\x1b[1m\x1b[34m✓✓\x1b[0m"),
    ):
        c.entry(
            common_pb2.Entry(offset=2, peer_eid=B, receipt=common_pb2.Receipt(signal_id="s1", status=status))
        )
        assert row().endswith(tail)
    assert list(c.lines) == ["s1"] and c.lines["s1"].text == "hi"  # the pending line, now SENT


def test_a_message_from_the_peer_ends_their_typing() -> None:
    from bimip.sdk import TYPING, ActivityChanged

    c = Conversation(A, "laptop", B)
    c.event(ActivityChanged(B, "phone", TYPING, None))
    assert any("is typing…" in row for row in c.render("", 60, 8, color=False))
    c.entry(
        common_pb2.Entry(
            offset=1,
            peer_eid=B,
            message=common_pb2.Message(signal_id="s2", sender=common_pb2.Identity(eid=B), payload=b"yo"),
        )
    )
    assert not any("is typing…" in row for row in c.render("", 60, 8, color=False))


async def test_piped_input_is_sent_and_each_change_is_printed(backend: Backend, tmp_path: Path) -> None:
    """Without a terminal the chat reads lines and prints each new or changed line; at the end
    of its input it waits for what was written to go out, then exits."""
    async with running_suite(backend, tmp_path) as suite:
        async with apps(suite, tmp_path, f"{B}/phone") as (bob,):
            process = await asyncio.create_subprocess_exec(
                *chat(suite, tmp_path, A, "script", B),
                env={"BIMIP_JWT_SECRET": JWT_SECRET, "BIMIP_VAR_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(b"one\n/busy\ntwo\n"), 60)
            assert process.returncode == 0, err.decode()
            printed = out.decode().splitlines()
            assert any(line.endswith("you        one ✓") for line in printed), printed
            assert any(line.endswith("you        two ✓") for line in printed), printed
            assert "you are busy" in printed
            await eventually(lambda: [e.message.payload for e in bob.of(MessageReceived)] == [b"one", b"two"])

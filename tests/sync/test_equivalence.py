"""State equivalence (the Zulip `verify_action` idea, SPEC S1–S3): for random sequences of sends,
reads, edits and deletes across three devices, what sync gives every device matches a model of the
conversation kept by the test, and snapshots built through checkpoints equal one folded at once."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bimip.common.v1 import common_pb2
from services.sync.snapshots import Fold
from tests.conftest import Backend
from tests.messaging_client import Device, devices, message
from tests.suite import running_suite
from tests.sync.client import SyncDevice

READ = common_pb2.DELIVERY_STATUS_READ
EDIT = common_pb2.COMMAND_KIND_EDIT
DELETE_ALL = common_pb2.COMMAND_KIND_DELETE_FOR_EVERYONE
DELETE_ME = common_pb2.COMMAND_KIND_DELETE_FOR_ME
KINDS = ("send", "send", "read", "read", "edit", "delete_all", "delete_me")
_cases = itertools.count()


@dataclass
class Sent:
    client_id: str
    sender: str
    signal_id: str
    payload: bytes
    hidden_for: set[str] = field(default_factory=set)


@dataclass
class Model:
    """What each user should see: the messages in commit order and each user's read position."""

    messages: list[Sent] = field(default_factory=list)
    read_upto: dict[str, int] = field(default_factory=dict)  # user -> index of the last read message

    def visible(self, user: str) -> list[tuple[int, Sent]]:
        return [(i, m) for i, m in enumerate(self.messages) if user not in m.hidden_for]

    def summary(self, user: str) -> tuple[str, bytes, int] | None:
        shown = self.visible(user)
        if not shown:
            return None
        upto = self.read_upto.get(user, -1)
        unread = sum(1 for i, m in shown if m.sender != user and i > upto)
        last = shown[-1][1]
        return last.client_id, last.payload, unread


ops = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 2), st.integers(0, 1000)), min_size=4, max_size=16
)


async def _apply(ops: list[tuple[str, int, int]], devs: list[Device], users: list[str], model: Model) -> None:
    clock = common_pb2.HybridLogicalClock
    for step, (kind, who, pick) in enumerate(ops):
        device = devs[who]
        me, peer = device.eid, users[1] if device.eid == users[0] else users[0]
        mine = [m for m in model.messages if m.sender == me and not m.hidden_for]
        theirs = [m for m in model.messages if m.sender == peer and me not in m.hidden_for]
        if kind == "send" or (kind in ("edit", "delete_all") and not mine) or (kind == "read" and not theirs):
            client_id = f"s{step}"
            ack = await device.sent(message(peer, client_id, client_id.encode()))
            model.messages.append(Sent(client_id, me, ack.signal_id, client_id.encode()))
        elif kind == "read":
            target = theirs[pick % len(theirs)]
            index = model.messages.index(target)
            await device.wait_for(
                lambda d=device, t=target: any(m.signal_id == t.signal_id for m in d.messages())
            )
            answer = await device.mark(READ, signal_id=target.signal_id)
            assert answer.WhichOneof("frame") != "error", answer
            model.read_upto[me] = max(model.read_upto.get(me, -1), index)
        elif kind == "edit":
            target = mine[pick % len(mine)]
            target.payload = f"e{step}".encode()
            edit = {"kind": EDIT, "clock": clock(wall_time_ms=step + 1), "payload": target.payload}
            assert (await device.command(signal_id=target.signal_id, **edit)).WhichOneof("frame") != "error"
        elif kind == "delete_all":
            target = mine[pick % len(mine)]
            target.hidden_for |= set(users)
            answer = await device.command(
                signal_id=target.signal_id, kind=DELETE_ALL, clock=clock(wall_time_ms=step + 1)
            )
            assert answer.WhichOneof("frame") != "error", answer
        else:  # delete for me: either user, any message still visible to them
            visible = [m for _, m in model.visible(me)]
            if not visible:
                continue
            target = visible[pick % len(visible)]
            target.hidden_for.add(me)
            answer = await device.command(
                signal_id=target.signal_id, kind=DELETE_ME, clock=clock(wall_time_ms=step + 1)
            )
            assert answer.WhichOneof("frame") != "error", answer


async def _case(backend: Backend, var_dir: Path, ops: list[tuple[str, int, int]]) -> None:
    n = next(_cases)
    a, b = f"a{n}@example.com", f"b{n}@example.com"
    model = Model()
    async with running_suite(
        backend, var_dir, ["messaging", "sync"], BIMIP_CHECKPOINT_EVERY_ENTRIES="4"
    ) as suite:
        async with devices(suite, f"{a}/a1", f"{a}/a2", f"{b}/b1") as devs:
            await _apply(ops, devs, [a, b], model)
        async with suite.channel("sync") as channel:
            for user, names in ((a, ("a1", "a2", "a3")), (b, ("b1", "b2", "b3"))):
                syncs = [SyncDevice(suite, channel, user, d) for d in names]
                # Catch up in small pages (each delta may take a checkpoint on the way).
                everything = await syncs[2].everything()  # a3/b3 sent nothing: it sees the whole log
                head = (await syncs[0].delta(0)).head
                assert [e.offset for e in everything] == list(range(1, head + 1))
                snapshots = [await s.snapshot(head) for s in syncs]
                assert len({(s.snapshot_id, s.checksum) for s in snapshots}) == 1  # every device alike
                # Built from checkpoints = folded at once from the entries a device received.
                fold = Fold(user)
                for entry in everything:
                    fold.apply(entry)
                assert fold.checksum() == snapshots[0].checksum
                # And what the model expects.
                expected = model.summary(user)
                conversations = list(snapshots[0].conversations)
                if expected is None:
                    assert all(not c.HasField("last_entry") for c in conversations)
                else:
                    (c,) = conversations
                    last = c.last_entry.message
                    assert (last.client_id, last.payload, c.unread_count) == expected


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_sync_agrees_with_a_model_of_the_conversation(
    backend: Backend, tmp_path: Path, ops: list[tuple[str, int, int]]
) -> None:
    asyncio.run(_case(backend, tmp_path / f"case-{next(_cases)}", ops))

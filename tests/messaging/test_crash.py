"""A messaging process killed with messages in flight loses nothing that was acknowledged (M2, M3).

"With messages in flight, kill the messaging process (SIGKILL), start it again; every message that
got a SENT ack is delivered exactly once after client de-duplication by offset, in order, and
messages without an ack can be retried safely." On both backends: the embedded one is a process on
the backend's SQLite file, the scale one a process on PostgreSQL and Redis.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import grpc

from bimip.common.v1 import common_pb2
from bimip.messaging.v1 import messaging_pb2
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import Device, connect, message
from tests.processes import ServiceProcess, free_ports, token
from tests.suite import suite_env

A, B = "alice@example.com", "bob@example.com"

N = 200  # messages A1 means to send
WINDOW = 40  # sends A1 keeps written but unacknowledged (pipelining)
GATE = 50  # before writing this one, B1 must be receiving (and acks what it has)
KILL_AFTER = 120  # SIGKILL right after writing this many sends

CLIENT_IDS = [f"m-{i:03d}" for i in range(N)]


def payload(client_id: str) -> bytes:
    return f"payload of {client_id}".encode()


def send_frame(client_id: str) -> messaging_pb2.SendRequest:
    return messaging_pb2.SendRequest(message=message(B, client_id, payload(client_id)))


def acks_of(device: Device) -> dict[str, messaging_pb2.SendAck]:
    return {ack.client_id: ack for ack in device.of("sent")}


async def within_window(device: Device, written: int) -> None:
    """Pipelining: at most WINDOW sends written and not yet answered."""

    def room() -> bool:
        return written - len(device.of("sent")) < WINDOW

    if not room():
        await eventually(room, timeout=15, interval=0.002)


async def read_until(device: Device, done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Receive and acknowledge (cumulatively, as a client does) until `done()`."""
    acked = device.opened.cursor
    while not done():
        await device.wait_for(
            lambda acked=acked: done() or max(device.offsets(), default=0) > acked, timeout=timeout
        )
        top = max(device.offsets(), default=0)
        if top > acked:
            reply = await device.ack(top)
            assert reply.WhichOneof("frame") == "cursor", reply
            acked = top


async def test_sigkill_with_sends_in_flight_loses_no_acked_message(backend: Backend, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    env = suite_env(backend, tmp_path, BIMIP_REPLICA_ID="crash-test")
    process = ServiceProcess("messaging", env, tmp_path / "messaging.log", port=port)
    try:
        # --- before the crash: A1 pipelines sends to B while B1 receives -------------------------
        process.start()
        await process.wait_serving()
        async with grpc.aio.insecure_channel(process.address) as channel:
            b1 = await connect(channel, token(env, B, "b1"), B, "b1")
            a1 = await connect(channel, token(env, A, "a1"), A, "a1")
            try:
                for i in range(KILL_AFTER):
                    if i == GATE:
                        await b1.wait_entries(10)
                        reply = await b1.ack(max(b1.offsets()))
                        assert reply.WhichOneof("frame") == "cursor", reply
                    await within_window(a1, written=i)
                    await a1.write(send=send_frame(CLIENT_IDS[i]))
                returncode = await process.kill()
                # Whatever was already on its way to the clients still arrives; then the streams end.
                await eventually(lambda: a1.finished and b1.finished, timeout=15)
            finally:
                await a1.close()
                await b1.close()
        assert returncode == -signal.SIGKILL
        assert a1.ended is not None and b1.ended is not None
        assert not a1.of("error"), a1.of("error")
        acked_before = acks_of(a1)
        assert 0 < len(acked_before) < KILL_AFTER, "the kill must come with sends in flight"
        assert not any(ack.duplicate for ack in acked_before.values())
        received_before = b1.entries()
        processed = len(received_before)
        assert [e.offset for e in received_before] == list(range(1, processed + 1))
        assert processed >= 10

        # --- after the restart: B1 resumes, A1 retries everything that got no SENT ack ------------
        process.start()
        await process.wait_serving()
        async with grpc.aio.insecure_channel(process.address) as channel:
            b1_again = await connect(channel, token(env, B, "b1"), B, "b1", processed_offset=processed)
            a1_again = await connect(channel, token(env, A, "a1"), A, "a1")
            a2 = await connect(channel, token(env, A, "a2"), A, "a2")  # a new device: all of A's log
            try:
                assert b1_again.opened.cursor == processed  # what B1 processed counts as acked
                retried = [c for c in CLIENT_IDS if c not in acked_before]
                seqs = [await a1_again.write(send=send_frame(c)) for c in retried]
                replies = [await a1_again.reply(seq) for seq in seqs]
                assert all(r.WhichOneof("frame") == "sent" for r in replies), [
                    r for r in replies if r.WhichOneof("frame") != "sent"
                ]
                acked_after = {r.sent.client_id: r.sent for r in replies}
                assert list(acked_after) == retried

                await read_until(b1_again, lambda: processed + len(b1_again.entries()) >= N)
                await read_until(
                    a2, lambda: sum(e.WhichOneof("body") == "message" for e in a2.entries()) >= N
                )
            finally:
                for device in (b1_again, a1_again, a2):
                    await device.close()

        # --- what B1 got, de-duplicated by offset: each message once, in send order, no gaps ------
        by_offset: dict[int, common_pb2.Entry] = {}
        for entry in received_before + b1_again.entries():
            seen = by_offset.setdefault(entry.offset, entry)
            assert seen.message.signal_id == entry.message.signal_id, f"offset {entry.offset} changed"
        assert sorted(by_offset) == list(range(1, N + 1))
        log_b = [by_offset[o].message for o in range(1, N + 1)]
        assert [m.client_id for m in log_b] == CLIENT_IDS
        assert [m.payload for m in log_b] == [payload(c) for c in CLIENT_IDS]
        assert all(m.sender.eid == A and m.sender.device_id == "a1" for m in log_b)
        assert len({m.signal_id for m in log_b}) == N
        # After the restart B1 got only what it had not processed, each entry once.
        assert [e.offset for e in b1_again.entries()] == list(range(processed + 1, N + 1))

        # --- every SENT ack, before the crash or on retry, names that one message ---------------
        # A's log as a new device of A reads it: one mirror entry per client id, in send order.
        mirrors = [e for e in a2.entries() if e.WhichOneof("body") == "message"]
        assert [e.message.client_id for e in mirrors] == CLIENT_IDS
        in_a = {e.message.client_id: (e.offset, e.message.signal_id) for e in mirrors}
        in_b = {m.client_id: m.signal_id for m in log_b}
        acks = {**acked_before, **acked_after}
        assert sorted(acks) == CLIENT_IDS
        for client_id, ack in acks.items():
            assert ack.status == common_pb2.DELIVERY_STATUS_SENT
            assert (ack.offset, ack.signal_id) == in_a[client_id], (client_id, ack)
            assert ack.signal_id == in_b[client_id]
        # A retry of a message committed before the crash is a duplicate (M3), never a new one.
        committed_unacked = [c for c in retried if acked_after[c].duplicate]
        assert committed_unacked == retried[: len(committed_unacked)]
        assert not any(acked_after[c].duplicate for c in retried[len(committed_unacked) :])
    finally:
        process.ensure_dead()

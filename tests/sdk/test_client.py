"""The Python SDK against real servers: SPEC scenarios 1 and 2, exactly-once delivery to the
application, the durable outbox, and reconnection after the servers stop and start again."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import pytest

from bimip.common.v1 import common_pb2
from bimip.sdk import (
    BimipClientError,
    Client,
    ConnectionChanged,
    MessageMirrored,
)
from tests.conftest import Backend
from tests.helpers import eventually
from tests.processes import free_ports
from tests.sdk.apps import apps
from tests.suite import running_suite

A, B = "alice@example.com", "bob@example.com"
DELIVERED, READ = common_pb2.DELIVERY_STATUS_DELIVERED, common_pb2.DELIVERY_STATUS_READ


async def test_scenarios_1_and_2_through_the_sdk(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        async with apps(suite, tmp_path, f"{A}/a1", f"{A}/a2", f"{B}/b1") as (a1, a2, b1):
            sent = await a1.client.send(B, b"hello", client_id="m1")
            assert (sent.client_id, sent.duplicate) == ("m1", False) and sent.offset == 1
            await eventually(lambda: b1.received() == ["m1"])
            # Scenario 2: A2 gets the mirror once; the sender's devices learn DELIVERED.
            await eventually(lambda: [e.message.client_id for e in a2.of(MessageMirrored)] == ["m1"])
            await eventually(lambda: a1.statuses("m1") == [DELIVERED] and a2.statuses("m1") == [DELIVERED])
            # B2 comes online later and gets it too; then B1 reads it and A learns READ.
            async with apps(suite, tmp_path, f"{B}/b2") as (b2,):
                await eventually(lambda: b2.received() == ["m1"])
            await b1.client.mark_read(sent.signal_id)
            await eventually(lambda: a1.statuses("m1") == [DELIVERED, READ])
            status = await a1.client.message_status(sent.signal_id)
            assert status.aggregate == READ
            # A retry with the same client id is the same message.
            again = await a1.client.send(B, b"hello", client_id="m1")
            assert (again.signal_id, again.duplicate) == (sent.signal_id, True)
            # Refusals raise the server's status and reason.
            with pytest.raises(BimipClientError) as info:
                await a1.client.send("not-an-eid", b"x")
            assert (info.value.code, info.value.reason) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_RECIPIENT",
            )
            with pytest.raises(BimipClientError) as info:
                await b1.client.mark_read("0" * 26)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert b1.received() == ["m1"]  # never twice


async def test_a_bad_token_is_refused_at_start(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        token = suite.token(A, "a1")
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        client = Client(
            forged,
            messaging=suite.address("messaging"),
            sync=suite.address("sync"),
            awareness=None,
            store=tmp_path / "x.db",
        )
        with pytest.raises(BimipClientError) as info:
            await client.start()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_servers_stop_and_start_again_nothing_lost_nothing_twice(
    backend: Backend, tmp_path: Path
) -> None:
    messaging_port, sync_port = free_ports(2)
    ports = {"BIMIP_MESSAGING_PORT": str(messaging_port), "BIMIP_SYNC_PORT": str(sync_port)}
    stack = contextlib.AsyncExitStack()
    suite = await stack.enter_async_context(running_suite(backend, tmp_path, ["messaging", "sync"], **ports))
    try:
        async with apps(suite, tmp_path, f"{A}/a1", f"{B}/b1") as (a1, b1):
            await a1.client.send(B, b"before", client_id="before")
            await eventually(lambda: b1.received() == ["before"])
            await stack.aclose()  # the servers stop in the middle of the conversation
            await eventually(lambda: a1.client.state == "reconnecting" and b1.client.state == "reconnecting")
            # Written while the servers are down: kept in the outbox, sent when they return.
            offline = [
                asyncio.create_task(a1.client.send(B, f"offline-{i}".encode(), client_id=f"offline-{i}"))
                for i in range(3)
            ]
            await asyncio.sleep(0)
            assert not any(task.done() for task in offline)
            stack = contextlib.AsyncExitStack()
            await stack.enter_async_context(running_suite(backend, tmp_path, ["messaging", "sync"], **ports))
            results = await asyncio.wait_for(asyncio.gather(*offline), 60)
            # In the order written, once each (A's log also holds the receipt of "before").
            first = results[0].offset
            assert [r.offset for r in results] == [first, first + 1, first + 2]
            assert [r.duplicate for r in results] == [False, False, False]
            await a1.client.send(B, b"after", client_id="after")
            await eventually(lambda: len(b1.received()) == 5, timeout=30)
            assert b1.received() == ["before", "offline-0", "offline-1", "offline-2", "after"]
            states = [e.state for e in a1.of(ConnectionChanged)]
            assert states[0] == "connected" and "reconnecting" in states and states[-1] == "connected"
    finally:
        await stack.aclose()


async def test_a_backlog_arrives_in_batches_once_each_and_in_order(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        async with apps(suite, tmp_path, f"{A}/a1") as (a1,):
            for i in range(50):
                await a1.client.send(B, f"backlog {i}".encode(), client_id=f"b{i}")
        async with apps(suite, tmp_path, f"{B}/b1") as (b1,):
            await eventually(lambda: len(b1.received()) == 50, timeout=30)
            assert b1.received() == [f"b{i}" for i in range(50)]
            stats = b1.client.stats
            assert stats.batches > 0  # entries ready together came several to a frame
            assert stats.deliveries == 50 and stats.dropped == 0

"""SPEC S1, S2, S5, S6 end to end: delta pages, the hello exchange, device listing (scenarios 3, 5)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from bimip.core.errors import reason_of
from tests.conftest import Backend
from tests.messaging_client import devices, message
from tests.suite import running_suite
from tests.sync.client import SyncDevice, offline

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
SERVICES = ["messaging", "sync"]


async def test_scenario_3_offline_device_pulls_everything_then_its_cursor_is_at_the_head(
    backend: Backend, tmp_path: Path
) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1") as (a1,):
            for i in range(5):
                await a1.sent(message(B, f"m{i}"))
        b1 = SyncDevice(suite, channel, B, "b1")
        hello = await b1.hello()
        await hello.open(0)
        end = await hello.until_end()
        assert end.head == 5
        assert [e.message.client_id for e in hello.entries()] == [f"m{i}" for i in range(5)]
        assert [e.offset for e in hello.entries()] == [1, 2, 3, 4, 5]  # in order
        acked = await hello.reply(await hello.write(ack={"offset": end.head}))
        assert acked.acked.cursor == 5
        await hello.close()
        listed = await b1.devices()
        assert listed.head == 5
        assert [(d.device_id, d.cursor) for d in listed.devices] == [("b1", 5)]
        # The same catch-up through the delta calls: pages of 2, and one server stream.
        pages = [await b1.delta(0, page_size=2)]
        while pages[-1].more:
            pages.append(await b1.delta(pages[-1].next_version, page_size=2))
        assert [[e.offset for e in p.entries] for p in pages] == [[1, 2], [3, 4], [5]]
        assert [p.head for p in pages] == [5, 5, 5]
        streamed = await b1.stream_delta(0, page_size=2)
        assert [e.offset for p in streamed for e in p.entries] == [1, 2, 3, 4, 5]
        assert not streamed[-1].more and streamed[-1].next_version == 5


async def test_scenario_5_hello_uploads_offline_messages_and_receives_the_rest(
    backend: Backend, tmp_path: Path
) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a2") as (a2,):
            for i in range(5):
                await a2.sent(message(B, f"from-a2-{i}"))
        a1 = SyncDevice(suite, channel, A, "a1")
        # Written offline, uploaded out of order: the server appends by local sequence.
        mine = [offline(B, f"from-a1-{i}", f"1700000000{i}:0:a1") for i in (2, 0, 1)]
        hello = await a1.hello()
        await hello.open(0, *mine)
        end = await hello.until_end()
        appended = hello.of("appended")
        assert [x.client_id for x in appended] == ["from-a1-0", "from-a1-1", "from-a1-2"]
        assert [x.offset for x in appended] == [6, 7, 8] and all(x.signal_id for x in appended)
        # The 5 from A2; never its own 3 back.
        assert [e.message.client_id for e in hello.entries()] == [f"from-a2-{i}" for i in range(5)]
        assert end.head == 8
        assert (await hello.reply(await hello.write(ack={"offset": 8}))).acked.cursor == 8
        await hello.close()
        # A second hello with nothing new transfers nothing.
        again = await a1.hello()
        await again.open(end.head)
        assert (await again.until_end()).head == 8
        assert [f.WhichOneof("frame") for f in again.frames] == ["end"]
        await again.close()
        # Uploading the same messages again (a lost answer) appends nothing new.
        retry = await a1.hello()
        await retry.open(8, *mine)
        await retry.until_end()
        assert sorted((x.offset, x.duplicate) for x in retry.of("appended")) == [
            (6, True),
            (7, True),
            (8, True),
        ]
        await retry.close()
        # A device that lost its local copy says so with its version: that decides what is sent,
        # and the cursor never moves back.
        lost = await a1.hello()
        await lost.open(0)
        assert (await lost.until_end()).head == 8
        assert [e.message.client_id for e in lost.entries()] == [f"from-a2-{i}" for i in range(5)]
        assert (await lost.reply(await lost.write(ack={"offset": 3}))).acked.cursor == 8
        await lost.close()
        # B received all 8, A1's in local-sequence order.
        b1 = SyncDevice(suite, channel, B, "b1")
        received = [e.message.client_id for e in await b1.everything()]
        assert received == [f"from-a2-{i}" for i in range(5)] + [f"from-a1-{i}" for i in range(3)]


async def test_hello_refuses_bad_uploads_one_by_one_and_keeps_the_rest(
    backend: Backend, tmp_path: Path
) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        a1 = SyncDevice(suite, channel, A, "a1")
        hello = await a1.hello()
        no_client_id = offline(B, "", "3:0:a1")
        await hello.open(
            0,
            offline(B, "ok-1", "1:0:a1"),
            offline(B, "bad-seq", ""),
            no_client_id,
            offline("no-at-sign", "bad-recipient", "2:0:a1"),
            offline(B, "ok-2", "4:0:a1"),
        )
        await hello.until_end()
        outcome = {x.client_id: (x.offset, x.error.reason) for x in hello.of("appended")}
        assert outcome == {
            "bad-seq": (0, "INVALID_LOCAL_SEQ"),
            "ok-1": (1, ""),
            "": (0, "CLIENT_ID_REQUIRED"),
            "bad-recipient": (0, "INVALID_RECIPIENT"),
            "ok-2": (2, ""),
        }
        # After the end: an ack beyond the head is refused on its own frame; the stream goes on.
        refused = await hello.reply(await hello.write(ack={"offset": 99}))
        assert refused.error.reason == "ACK_BEYOND_HEAD"
        assert (await hello.reply(await hello.write(ack={"offset": 2}))).acked.cursor == 2
        await hello.close()


@pytest.mark.parametrize(
    ("frames", "code", "reason"),
    [
        ([{"ack": {"offset": 1}}], grpc.StatusCode.FAILED_PRECONDITION, "OPEN_REQUIRED"),
        ([{"open": {"last_version": -1}}], grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
        ([{"open": {"last_version": 7}}], grpc.StatusCode.FAILED_PRECONDITION, "SNAPSHOT_REQUIRED"),
        (
            [{"open": {"more": True}}, {"ack": {"offset": 0}}],
            grpc.StatusCode.FAILED_PRECONDITION,
            "UPLOAD_EXPECTED",
        ),
    ],
)
async def test_hello_refuses_a_malformed_exchange(
    backend: Backend, tmp_path: Path, frames: list[dict[str, object]], code: grpc.StatusCode, reason: str
) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        hello = await SyncDevice(suite, channel, A, "a1").hello()
        for frame in frames:
            await hello.write(**frame)
        err = await hello.ended_with()
        assert (err.code(), reason_of(err)) == (code, reason)


async def test_an_oversized_hello_appends_nothing(backend: Backend, tmp_path: Path) -> None:
    env = {"BIMIP_HELLO_MAX_MESSAGES": "3"}
    async with running_suite(backend, tmp_path, SERVICES, **env) as suite, suite.channel("sync") as channel:
        a1 = SyncDevice(suite, channel, A, "a1")
        hello = await a1.hello()
        await hello.open(0, *(offline(B, f"m{i}", f"{i}:0:a1") for i in range(2)), more=True)
        await hello.write(upload={"messages": [offline(B, f"n{i}", f"{i}:1:a1") for i in range(2)]})
        err = await hello.ended_with()
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
        assert (await a1.delta(0)).head == 0  # nothing was appended
        # Others are served meanwhile, and the same messages in smaller hellos go through.
        small = await a1.hello()
        await small.open(0, *(offline(B, f"m{i}", f"{i}:0:a1") for i in range(2)))
        assert (await small.until_end()).head == 2
        await small.close()


async def test_delta_refuses_unusable_versions_and_page_sizes(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1") as (a1,):
            await a1.sent(message(B, "one"))
        b1 = SyncDevice(suite, channel, B, "b1")
        cases = [
            (b1.delta(2), grpc.StatusCode.FAILED_PRECONDITION, "SNAPSHOT_REQUIRED"),
            (b1.delta(-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
            (b1.delta(0, page_size=1001), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE"),
            (b1.delta(0, page_size=-3), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE"),
            (b1.stream_delta(5), grpc.StatusCode.FAILED_PRECONDITION, "SNAPSHOT_REQUIRED"),
            (b1.stream_delta(-5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VERSION"),
        ]
        for call, code, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert (info.value.code(), reason_of(info.value)) == (code, reason)
        assert [e.message.client_id for e in (await b1.delta(0)).entries] == ["one"]  # still serving
        anonymous = SyncDevice(suite, channel, B, "b1")
        anonymous.metadata = ()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await anonymous.delta(0)
        assert (info.value.code(), reason_of(info.value)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_MISSING",
        )


async def test_each_user_syncs_only_their_own_log(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, SERVICES) as suite, suite.channel("sync") as channel:
        async with devices(suite, f"{A}/a1") as (a1,):
            await a1.sent(message(B, "to-b"))
        carol = SyncDevice(suite, channel, C, "c1")  # the token decides whose log: nothing names another
        assert (await carol.delta(0)).head == 0
        assert list((await carol.devices()).devices) == []

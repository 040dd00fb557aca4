"""Prometheus metrics: real traffic through the real services, then a real scrape of /metrics.

Every suite has its own registry and endpoint (BIMIP_METRICS_PORT=0), so the numbers asserted are
exactly this test's. Values that depend on how many frames reached the clients are compared with
what the clients recorded.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.core.clock import FakeClock
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from tests.awareness.test_presence import open_stream, subscribe
from tests.conftest import Backend
from tests.helpers import eventually
from tests.messaging_client import devices, message
from tests.processes import free_ports
from tests.suite import Suite, running_suite
from tests.sync.client import SyncDevice, offline

A, B = "alice.metrics@example.com", "bob.metrics@example.com"
A1, B1 = "phone-7f3a", "laptop-c41e"
PAYLOAD = b"payload-9d2c"


class Scrape:
    """One scrape of /metrics, parsed: `scrape(sample name, **labels)` is a sample's value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.values, f"no sample {name}{labels}"
        return self.values[key]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


async def scrape(port: int | None) -> Scrape:
    assert port, "the suite serves no metrics"
    return Scrape(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics"))


async def until(suite: Suite, check: Callable[[Scrape], object]) -> Scrape:
    """Scrape until `check` passes (its asserts), and return that scrape."""
    last: list[Scrape] = []

    async def attempt() -> bool:
        last[:] = [await scrape(suite.shared.metrics_port)]
        check(last[0])
        return True

    await eventually(attempt, timeout=15)
    return last[0]


def no_ids(text: str, *ids: str) -> None:
    """No label or value of any metric names a user, a device, a client id or a payload."""
    for forbidden in ids:
        assert forbidden not in text, f"{forbidden!r} appears in the scrape"


def _stream_count(service: str, kind: str, expected: float) -> Callable[[Scrape], None]:
    def check(s: Scrape) -> None:
        assert s("bimip_open_streams", service=service, kind=kind) == expected

    return check


async def test_messaging_sends_deliveries_acks_lag_and_streams(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging"]) as suite:
        async with devices(suite, f"{A}/{A1}", f"{B}/{B1}") as (a1, b1):
            await until(suite, _stream_count("messaging", "connect", 2))
            for i in range(3):
                await a1.sent(message(B, f"m-{i}", PAYLOAD))
            async with suite.channel("messaging") as channel:
                unary = await messaging_pb2_grpc.MessagingServiceStub(channel).SendMessage(
                    messaging_pb2.SendMessageRequest(message=message(B, "m-3", PAYLOAD)),
                    metadata=(("authorization", f"Bearer {suite.token(A, A1)}"),),
                )
            assert not unary.ack.duplicate
            assert (await a1.sent(message(B, "m-0", PAYLOAD))).duplicate  # an idempotent retry
            refused = await a1.send(message(B, "", PAYLOAD))
            assert refused.error.reason == "CLIENT_ID_REQUIRED"
            await b1.wait_entries(4)
            assert (await b1.ack(1)).cursor.cursor == 1  # 3 behind the head
            assert (await b1.ack(4)).cursor.cursor == 4  # caught up
            await a1.wait_for(lambda: len(a1.receipts()) == 4)  # DELIVERED receipts for A

            def sends_acks_deliveries(s: Scrape) -> None:
                assert s("bimip_messaging_sent_messages_total", via="stream") == 3
                assert s("bimip_messaging_sent_messages_total", via="unary") == 1
                assert s("bimip_messaging_sent_messages_total", via="sync") == 0
                assert s("bimip_messaging_duplicate_sends_total") == 1
                assert s("bimip_messaging_send_refusals_total", reason="CLIENT_ID_REQUIRED") == 1
                assert s("bimip_messaging_acks_total", via="stream") == 2
                assert s("bimip_messaging_acked_entries_total", via="stream") == 4
                assert s("bimip_messaging_acked_entries_total", via="sync") == 0
                assert s("bimip_messaging_device_lag_entries_count") == 2
                assert s("bimip_messaging_device_lag_entries_sum") == 3
                assert s("bimip_messaging_device_lag_entries_bucket", le="0.0") == 1
                assert s("bimip_messaging_device_lag_entries_bucket", le="10.0") == 2
                # Every entry either stream was sent: 4 messages to B1, 4 receipts to A1.
                assert s("bimip_messaging_delivered_entries_total") == len(a1.deliveries) + len(b1.deliveries)
                assert s("bimip_messaging_delivered_entries_total") == 8
                assert s("bimip_messaging_redelivered_entries_total") == 0
                assert s("bimip_open_streams", service="messaging", kind="connect") == 2
                assert s("bimip_messaging_commit_batch_size_sum") >= 4 + 2  # sends and acks, at least
                assert s("bimip_messaging_commit_seconds_count") >= 1

            seen = await until(suite, sends_acks_deliveries)
            no_ids(seen.text, A, B, A1, B1, "m-0", "m-3", PAYLOAD.decode())
        await until(suite, _stream_count("messaging", "connect", 0))


async def test_grace_redelivery_is_counted(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_suite(
        backend, tmp_path, ["messaging"], clock=clock, BIMIP_GRACE_PERIOD_S="30"
    ) as suite:
        async with devices(suite, f"{A}/{A1}", f"{B}/{B1}") as (a1, b1):
            await a1.sent(message(B, "m-1", PAYLOAD))
            await a1.sent(message(B, "m-2", PAYLOAD))
            await b1.wait_entries(2)

            def first_deliveries(s: Scrape) -> None:
                assert s("bimip_messaging_delivered_entries_total") == 2
                assert s("bimip_messaging_redelivered_entries_total") == 0

            await until(suite, first_deliveries)
            await clock.advance(31)  # unacknowledged past the grace period: both again (M6)
            await b1.wait_for(lambda: len(b1.deliveries) == 4)
            assert [d.redelivery for d in b1.deliveries] == [False, False, True, True]

            def redelivered(s: Scrape) -> None:
                assert s("bimip_messaging_delivered_entries_total") == len(b1.deliveries) == 4
                assert s("bimip_messaging_redelivered_entries_total") == 2

            await until(suite, redelivered)


async def test_sync_catch_up_volume_hello_uploads_and_acks(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["messaging", "sync"]) as suite:
        async with devices(suite, f"{A}/{A1}") as (a1,):
            for i in range(5):
                await a1.sent(message(B, f"m-{i}", PAYLOAD))
        async with suite.channel("sync") as channel:
            b1 = SyncDevice(suite, channel, B, B1)
            page = await b1.delta(0, page_size=2)
            assert len(page.entries) == 2
            streamed = await b1.stream_delta(0)
            assert sum(len(p.entries) for p in streamed) == 5
            hello = await b1.hello()
            uploads = [offline(A, f"off-{i}", f"1700000000{i}:0:{B1}", PAYLOAD) for i in range(2)]
            await hello.open(0, *uploads)
            end = await hello.until_end()
            assert end.head == 7 and len(hello.entries()) == 5  # A's five, not its own two uploads
            await until(suite, _stream_count("sync", "hello", 1))
            assert (await hello.reply(await hello.write(ack={"offset": 7}))).acked.cursor == 7
            await hello.close()
            resumed = await b1.resume(version=7)  # no ranges of its own: every range is repaired
            repaired = sum(len(r.entries) for r in resumed.repairs)
            assert repaired == 5

            def catch_up(s: Scrape) -> None:
                assert s("bimip_sync_entries_total", kind="delta") == 2
                assert s("bimip_sync_entries_total", kind="stream_delta") == 5
                assert s("bimip_sync_entries_total", kind="hello") == 5
                assert s("bimip_sync_entries_total", kind="resume") == repaired
                for kind in ("delta", "stream_delta", "hello", "resume"):
                    assert s("bimip_sync_requests_total", kind=kind) == 1
                assert s("bimip_sync_requests_total", kind="snapshot") == 0
                # The uploads went through messaging's append: sends that came by sync.
                assert s("bimip_messaging_sent_messages_total", via="sync") == 2
                assert s("bimip_messaging_sent_messages_total", via="stream") == 5
                assert s("bimip_messaging_acks_total", via="sync") == 1
                assert s("bimip_messaging_acked_entries_total", via="sync") == 7
                assert s("bimip_messaging_acks_total", via="stream") == 0  # passing over A1's own: no ack
                assert s("bimip_messaging_device_lag_entries_count") == 1
                assert s("bimip_messaging_device_lag_entries_sum") == 0
                assert s("bimip_open_streams", service="sync", kind="hello") == 0
                assert s("bimip_open_streams", service="sync", kind="stream_delta") == 0
                assert s("bimip_open_streams", service="messaging", kind="log_link") == 1  # sync's link

            seen = await until(suite, catch_up)
            no_ids(seen.text, A, B, A1, B1, "off-0", "m-0", PAYLOAD.decode())


async def test_presence_and_activity_events_are_counted(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()  # typing does not expire by itself during the test
    async with running_suite(backend, tmp_path, ["messaging", "awareness"], clock=clock) as suite:
        async with suite.channel("awareness") as channel:
            await subscribe(suite, channel, B, A)  # B sees A
            await subscribe(suite, channel, A, B)  # A sees B, so A may type to B
            b1 = await open_stream(suite, channel, B, B1)
            a1 = await open_stream(suite, channel, A, A1)
            try:
                await until(suite, _stream_count("awareness", "connect", 2))
                await eventually(lambda: [p.status for p in b1.of("presence")] == [aw.STATUS_ONLINE])
                dnd = await a1.ask(intent=aw.IntentRequest(intent=aw.STATUS_DND))
                assert dnd.WhichOneof("frame") == "ack"
                typing = await a1.ask(activity=aw.ActivityRequest(status=aw.STATUS_TYPING, peer_eid=B))
                assert typing.WhichOneof("frame") == "ack"
                await eventually(lambda: len(b1.of("activity")) == 1 and len(b1.of("presence")) == 2)
                await eventually(lambda: len(a1.of("intent")) == 1)

                def events(s: Scrape) -> None:
                    published = "bimip_awareness_published_events_total"
                    # B online, A online, A do-not-disturb
                    assert s(published, kind="presence") == 3
                    assert s(published, kind="intent") == 1
                    assert s(published, kind="activity") == 1
                    assert s(published, kind="subscription") == 8  # 2 changes x 2 users, each way
                    delivered = "bimip_awareness_delivered_events_total"
                    assert s(delivered, kind="presence") == len(a1.of("presence")) + len(b1.of("presence"))
                    assert s(delivered, kind="activity") == len(b1.of("activity")) == 1
                    assert s(delivered, kind="intent") == len(a1.of("intent")) == 1
                    assert s("bimip_open_streams", service="awareness", kind="connect") == 2

                seen = await until(suite, events)
                no_ids(seen.text, A, B, A1, B1)
            finally:
                await a1.close()
                await b1.close()
            await until(suite, _stream_count("awareness", "connect", 0))

            def offline_counted(s: Scrape) -> None:  # both went OFFLINE: two more presence changes
                assert s("bimip_awareness_published_events_total", kind="presence") == 5

            await until(suite, offline_counted)


async def test_one_endpoint_per_process_on_the_configured_port(backend: Backend, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    async with running_suite(backend, tmp_path / "one", BIMIP_METRICS_PORT=str(port)) as suite:
        assert suite.shared.metrics_port == port
        assert {s.metrics_port for s in suite.services.values()} == {port}  # one endpoint for all three
        async with devices(suite, f"{A}/{A1}") as (a1,):
            await a1.sent(message(B, "m-1", PAYLOAD))
            # Another suite in this process counts into a registry and an endpoint of its own.
            async with running_suite(backend, tmp_path / "other", ["messaging"]) as other:
                assert other.shared.metrics_port not in (None, port)
                assert (await scrape(other.shared.metrics_port))(
                    "bimip_messaging_sent_messages_total", via="stream"
                ) == 0

            def all_three(s: Scrape) -> None:
                assert s("bimip_messaging_sent_messages_total", via="stream") == 1
                assert s("bimip_open_streams", service="messaging", kind="connect") == 1
                assert s("bimip_open_streams", service="awareness", kind="connect") == 0
                assert s("bimip_open_streams", service="sync", kind="hello") == 0
                assert s("bimip_sync_requests_total", kind="delta") == 0
                assert {
                    "bimip_messaging_sent_messages",
                    "bimip_awareness_published_events",
                    "bimip_sync_entries",
                } <= s.families

            await until(suite, all_three)
        with pytest.raises(urllib.error.HTTPError) as elsewhere:
            await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/other")
        assert elsewhere.value.code == 404
    # The last service stopped: the endpoint is closed.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")


async def test_a_metrics_port_in_use_stops_the_start(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path / "first", ["messaging"]) as first:
        taken = str(first.shared.metrics_port)
        with pytest.raises(OSError, match=r"^metrics: cannot listen on 127\.0\.0\.1:\d+"):
            async with running_suite(backend, tmp_path / "second", ["messaging"], BIMIP_METRICS_PORT=taken):
                pass
        await scrape(first.shared.metrics_port)  # the first one's endpoint is untouched

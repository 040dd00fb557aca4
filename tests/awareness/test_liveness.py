"""A5: a device whose heartbeats stop, or whose awareness process dies, goes OFFLINE within the
presence TTL, detected by the replicas that survive."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.core.clock import FakeClock
from bimip.core.config import ConfigError, load_settings
from bimip.core.errors import reason_of
from services.awareness.config import AwarenessSettings
from tests.awareness.test_presence import OFFLINE, ONLINE, A, S, Stream, open_stream, subscribe
from tests.conftest import Backend
from tests.helpers import eventually
from tests.processes import ServiceProcess, free_ports, running_processes
from tests.suite import running_suite, suite_env


async def test_stopped_heartbeats_go_offline_within_the_ttl(backend: Backend, tmp_path: Path) -> None:
    clock = FakeClock()
    async with running_suite(
        backend, tmp_path, ["messaging", "awareness"], clock=clock, BIMIP_PRESENCE_TTL_S="30"
    ) as suite:
        async with suite.channel("awareness") as channel:
            await subscribe(suite, channel, S, A)
            s1 = await open_stream(suite, channel, S, "s1")
            a1 = await open_stream(suite, channel, A, "a1")  # never heartbeats
            assert a1.opened.presence_ttl_ms == 30_000
            await eventually(lambda: s1.presences(A) == [ONLINE])
            for _ in range(3):  # 27 s: S keeps heartbeating, A is still within its TTL
                await s1.ask(heartbeat=aw.ConnectRequest().heartbeat)
                await clock.advance(9)
            assert s1.presences(A) == [ONLINE]
            await s1.ask(heartbeat=aw.ConnectRequest().heartbeat)

            async def later() -> bool:  # time moves on a second per poll: the sweeper runs each second
                await clock.advance(1)
                return s1.presences(A) == [ONLINE, OFFLINE]

            await eventually(later)  # at 31 s or soon after: A's last sign of life was at 0
            assert [p for p in s1.of("presence") if p.eid == A][-1].HasField("last_seen")
            await eventually(lambda: a1.finished)
            assert a1.ended is not None and a1.ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert reason_of(a1.ended) == "HEARTBEAT_TIMEOUT"
            assert not s1.finished  # the one that heartbeats stays
            await s1.close()


async def test_a_dead_replicas_devices_go_offline(postgres_url: str, redis_url: str, tmp_path: Path) -> None:
    """Scale only (a dead process's devices are in Redis): awareness replica 2 is SIGKILLed while
    A's device is on it; S on replica 1 sees A OFFLINE within the TTL."""
    import uuid

    backend = Backend("scale", postgres_url, redis_url, f"bimip-t-dead-{uuid.uuid4().hex[:8]}")
    timers = {"BIMIP_PRESENCE_TTL_S": "2", "BIMIP_HEARTBEAT_INTERVAL_S": "1"}
    async with running_suite(backend, tmp_path, ["messaging", "awareness"], **timers) as suite:
        env = suite_env(backend, tmp_path, **timers, BIMIP_MESSAGING_ADDRESS=suite.address("messaging"))
        (port,) = free_ports(1)
        replica = ServiceProcess(
            "awareness", {**env, "BIMIP_REPLICA_ID": "doomed"}, tmp_path / "r2.log", port=port
        )
        async with running_processes([replica]):
            async with suite.channel("awareness") as one:
                await subscribe(suite, one, S, A)
                s1 = await open_stream(suite, one, S, "s1")
                import grpc as _grpc

                beating = asyncio.create_task(_heartbeats(s1, 0.5))  # S is a live client
                try:
                    async with _grpc.aio.insecure_channel(replica.address) as two:
                        a1 = await open_stream(suite, two, A, "a1")
                        await eventually(lambda: s1.presences(A) == [ONLINE])
                        await replica.kill()
                        await eventually(lambda: s1.presences(A) == [ONLINE, OFFLINE], timeout=15)
                        await a1.close()
                    assert not s1.finished
                finally:
                    beating.cancel()
                await s1.close()


async def _heartbeats(stream: Stream, every: float) -> None:
    """What a client does: a heartbeat every interval, for as long as its stream is open."""
    while not stream.finished:
        await stream.call.write(aw.ConnectRequest(heartbeat=aw.ConnectRequest().heartbeat))
        await asyncio.sleep(every)


def test_the_presence_ttl_is_never_shorter_than_a_heartbeat_interval() -> None:
    with pytest.raises(ConfigError, match="BIMIP_PRESENCE_TTL_S"):
        load_settings(AwarenessSettings, {"BIMIP_PRESENCE_TTL_S": "5", "BIMIP_HEARTBEAT_INTERVAL_S": "10"})

"""Wiring of the awareness service."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from bimip.awareness.v1 import awareness_pb2, awareness_pb2_grpc
from bimip.core.server import Runtime
from bimip.core.storage import create_engine
from services.awareness.config import AwarenessSettings
from services.awareness.presence import DeviceRegistry, InProcessDevices, Presence, RedisDevices
from services.awareness.servicer import AwarenessServicer, AwarenessStreams
from services.awareness.streams import StreamHub
from services.awareness.subscriptions import Subscriptions
from services.links import PresenceLink


class AwarenessApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        assert isinstance(settings, AwarenessSettings)
        self.writer_engine = create_engine(settings.database_url, writer=True)
        runtime.telemetry.instrument_engine(self.writer_engine)
        self.link = PresenceLink(
            settings.messaging_address, runtime.credentials, runtime.telemetry, runtime.clock
        )
        devices: DeviceRegistry = (
            RedisDevices(runtime.redis, settings.redis_namespace)
            if runtime.redis is not None
            else InProcessDevices()
        )
        self.hub = StreamHub(
            runtime.bus, settings.replica_id, runtime.telemetry.tracer("bimip.awareness"), runtime.metrics
        )
        presence = Presence(
            runtime.engine, self.writer_engine, devices, runtime.bus, runtime.clock, runtime.metrics
        )
        self.subscriptions = Subscriptions(self.writer_engine, runtime.clock, self.link)
        self.streams = AwarenessStreams(
            settings, runtime.clock, self.hub, presence, self.subscriptions, self.link
        )
        self.subscriptions.changed = self.streams.subscription_changed
        self._sweeper: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        servicer = AwarenessServicer(self.subscriptions, self.streams)
        awareness_pb2_grpc.add_AwarenessServiceServicer_to_server(servicer, server)
        return [awareness_pb2.DESCRIPTOR.services_by_name["AwarenessService"].full_name]

    async def start(self) -> None:
        await self.hub.start()
        self._sweeper = asyncio.create_task(self.streams.sweep_forever(), name="awareness-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.hub.stop()
        await self.streams.leaving.drain()
        await self.link.close()
        await self.writer_engine.dispose()


def build(runtime: Runtime) -> AwarenessApp:
    return AwarenessApp(runtime)

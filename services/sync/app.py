"""Wiring of the sync service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bimip.core.server import Runtime
from bimip.core.storage import create_engine
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc
from services.links import LogLink
from services.sync.config import SyncSettings
from services.sync.core import SyncCore
from services.sync.servicer import SyncServicer


class SyncApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        settings = runtime.settings
        assert isinstance(settings, SyncSettings)
        self.writer_engine = create_engine(settings.database_url, writer=True)
        runtime.telemetry.instrument_engine(self.writer_engine)
        self.link = LogLink(settings.messaging_address, runtime.credentials, runtime.telemetry, runtime.clock)
        self.core = SyncCore(
            settings, runtime.clock, runtime.engine, self.writer_engine, self.link, runtime.metrics
        )

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        sync_pb2_grpc.add_SyncServiceServicer_to_server(SyncServicer(self.core), server)
        return [sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.core.background.drain()
        await self.link.close()
        await self.writer_engine.dispose()


def build(runtime: Runtime) -> SyncApp:
    return SyncApp(runtime)

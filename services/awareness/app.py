"""Wiring of the awareness service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bimip.awareness.v1 import awareness_pb2, awareness_pb2_grpc
from bimip.core.server import Runtime
from bimip.core.storage import create_engine
from services.awareness.messaging_link import PresenceLink
from services.awareness.servicer import AwarenessServicer
from services.awareness.subscriptions import Subscriptions


class AwarenessApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.writer_engine = create_engine(runtime.settings.database_url, writer=True)
        runtime.telemetry.instrument_engine(self.writer_engine)
        self.link = PresenceLink(
            runtime.settings.messaging_address, runtime.credentials, runtime.telemetry, runtime.clock
        )
        self.subscriptions = Subscriptions(self.writer_engine, runtime.clock, self.link)

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        # Connect, SetIntent and SetVisibility are not built yet: they answer UNIMPLEMENTED.
        servicer = AwarenessServicer(self.subscriptions)  # type: ignore[abstract]
        awareness_pb2_grpc.add_AwarenessServiceServicer_to_server(servicer, server)
        return [awareness_pb2.DESCRIPTOR.services_by_name["AwarenessService"].full_name]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.link.close()
        await self.writer_engine.dispose()


def build(runtime: Runtime) -> AwarenessApp:
    return AwarenessApp(runtime)

"""Wiring of the messaging service: its servicers on a server, its background work."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bimip.core.server import Runtime
from bimip.core.streams import add_accepting_serialized
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc, messaging_pb2, messaging_pb2_grpc
from services.messaging.config import MessagingSettings
from services.messaging.servicer import Messaging, MessagingInternalServicer, MessagingServicer


class MessagingApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        assert isinstance(runtime.settings, MessagingSettings)
        self.core = Messaging(runtime, runtime.settings)

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        # Connect may yield a `deliveries` frame packed by the delivery code (take_batch).
        add_accepting_serialized(
            messaging_pb2_grpc.add_MessagingServiceServicer_to_server,
            MessagingServicer(self.core),
            server,
            ["Connect"],
        )
        internal_pb2_grpc.add_MessagingInternalServiceServicer_to_server(
            MessagingInternalServicer(self.core), server
        )
        return [
            messaging_pb2.DESCRIPTOR.services_by_name["MessagingService"].full_name,
            internal_pb2.DESCRIPTOR.services_by_name["MessagingInternalService"].full_name,
        ]

    async def start(self) -> None:
        await self.core.start()

    async def stop(self) -> None:
        await self.core.stop()


def build(runtime: Runtime) -> MessagingApp:
    return MessagingApp(runtime)

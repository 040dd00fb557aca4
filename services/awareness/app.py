"""Wiring of the awareness service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bimip.awareness.v1 import awareness_pb2, awareness_pb2_grpc
from bimip.core.server import Runtime
from services.awareness.servicer import AwarenessServicer


class AwarenessApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        awareness_pb2_grpc.add_AwarenessServiceServicer_to_server(AwarenessServicer(), server)  # type: ignore[abstract]  # RPCs not built yet answer UNIMPLEMENTED
        return [awareness_pb2.DESCRIPTOR.services_by_name["AwarenessService"].full_name]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def build(runtime: Runtime) -> AwarenessApp:
    return AwarenessApp(runtime)

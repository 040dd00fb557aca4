"""Wiring of the sync service."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bimip.core.server import Runtime
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc
from services.sync.servicer import SyncServicer


class SyncApp:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        sync_pb2_grpc.add_SyncServiceServicer_to_server(SyncServicer(), server)  # type: ignore[abstract]  # RPCs not built yet answer UNIMPLEMENTED
        return [sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def build(runtime: Runtime) -> SyncApp:
    return SyncApp(runtime)

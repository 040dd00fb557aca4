"""gRPC face of the sync service.

Until the sync rules are built, every RPC answers UNIMPLEMENTED (reason NOT_IMPLEMENTED) through
the generated base class; authentication already applies.
"""

from __future__ import annotations

from bimip.sync.v1 import sync_pb2_grpc


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    """Delta, snapshot, resume and hello (SPEC §3)."""

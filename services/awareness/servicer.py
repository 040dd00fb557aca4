"""gRPC face of the awareness service.

Until the awareness rules are built, every RPC answers UNIMPLEMENTED (reason NOT_IMPLEMENTED)
through the generated base class; authentication already applies.
"""

from __future__ import annotations

from bimip.awareness.v1 import awareness_pb2_grpc


class AwarenessServicer(awareness_pb2_grpc.AwarenessServiceServicer):
    """Presence, intent, activity and subscriptions (SPEC §2)."""

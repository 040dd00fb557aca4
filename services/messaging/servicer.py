"""gRPC face of the messaging service: protobuf in and out, domain errors to gRPC status.

Until the messaging rules are built, every RPC answers UNIMPLEMENTED (reason NOT_IMPLEMENTED)
through the generated base classes; authentication already applies to all of them.
"""

from __future__ import annotations

from bimip.messaging.v1 import internal_pb2_grpc, messaging_pb2_grpc


class MessagingServicer(messaging_pb2_grpc.MessagingServiceServicer):
    """The client-facing API (SPEC §1)."""


class MessagingInternalServicer(internal_pb2_grpc.MessagingInternalServiceServicer):
    """The streams awareness and sync use (SPEC X1, S7); service credentials only."""

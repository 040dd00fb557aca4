"""The SDK's one exception: the server's gRPC status and machine-readable reason."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from bimip.common.v1 import common_pb2
from bimip.core.errors import reason_of, status_code


class BimipClientError(Exception):
    """A refusal or failure, as the server reported it (see docs/errors.md for the reasons).

    `code` is the gRPC status code, `reason` the UPPER_SNAKE reason (empty when the server gave
    none, e.g. a network failure), `metadata` the extra facts (`field`, `limit`, …).
    """

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    @classmethod
    def from_frame(cls, error: common_pb2.Error) -> BimipClientError:
        return cls(status_code(error.code), error.reason, error.message, dict(error.metadata))

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> BimipClientError:
        return cls(error.code(), reason_of(error) or "", error.details() or "")

"""Errors with a machine-readable reason.

A refused call ends with a gRPC status whose details carry a ``google.rpc.ErrorInfo`` (domain
``bimip``) naming the reason, as Google's API design guide does; a refused frame on a stream is
answered with a ``bimip.common.v1.Error`` frame with the same code and reason, and the stream goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from bimip.common.v1 import common_pb2

DOMAIN = "bimip"


class BimipError(Exception):
    """A refusal: gRPC code, UPPER_SNAKE reason, message for developers, extra facts."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    def to_proto(self) -> common_pb2.Error:
        return common_pb2.Error(
            code=self.code.value[0], reason=self.reason, message=self.message, metadata=self.metadata
        )

    @classmethod
    def from_proto(cls, error: common_pb2.Error) -> BimipError:
        """The refusal another service answered with, as the same status and reason."""
        return cls(status_code(error.code), error.reason, error.message, dict(error.metadata))

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        return rpc_status.to_status(status)

    async def abort(self, context: grpc.aio.ServicerContext[object, object]) -> NoReturn:
        status = self.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("unreachable: abort raises")


T = TypeVar("T")


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number (as `Error.code` carries it); UNKNOWN if none."""
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN)


async def answer(work: Awaitable[T], context: grpc.aio.ServicerContext[Any, Any]) -> T:
    """The result of a unary handler's work; a BimipError ends the call with its status and reason."""
    try:
        return await work
    except BimipError as err:
        await err.abort(context)


def invalid(reason: str, message: str, **metadata: str) -> BimipError:
    return BimipError(grpc.StatusCode.INVALID_ARGUMENT, reason, message, metadata)


def unauthenticated(reason: str, message: str) -> BimipError:
    return BimipError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def unimplemented(method: str) -> BimipError:
    return BimipError(grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED", f"{method} is not implemented yet")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of a failed call, if the server sent one (for clients and tests)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def reason_of(error: grpc.aio.AioRpcError) -> str | None:
    info = error_info(error)
    return info.reason if info else None

"""What every service's streams share: the first frame is `open` and comes soon; work that must
run to its end even when a handler is cancelled; response streams that may yield frames already
serialized."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from typing import Any, TypeVar

import grpc

from bimip.core.errors import BimipError

F = TypeVar("F")  # a request message whose oneof is named `frame`


async def open_frame(requests: AsyncIterator[F], within: float) -> F | None:
    """The stream's first frame, which must be `open` and arrive within `within` seconds; None when
    the client closed the stream without sending anything. Raises FAILED_PRECONDITION /
    OPEN_REQUIRED otherwise."""
    try:
        async with asyncio.timeout(within):
            first = await anext(requests)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise BimipError(
            grpc.StatusCode.FAILED_PRECONDITION, "OPEN_REQUIRED", f"no `open` frame within {within:g} s"
        ) from None
    message: Any = first
    if message.WhichOneof("frame") != "open":
        raise BimipError(
            grpc.StatusCode.FAILED_PRECONDITION, "OPEN_REQUIRED", "the first frame of a stream must be `open`"
        )
    return first


T = TypeVar("T")


class RunToEnd:
    """Work that must finish even when the caller is cancelled — a stream's leaving, a database
    read (one cut off mid-query makes the driver tear its connection down) — and that shutdown
    waits for with `drain`."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        return await asyncio.shield(self.start(work))

    def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start `work` in the background; `drain` waits for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


def serialize_or_pass(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """`serializer`, except that bytes (a frame the handler serialized itself) go out as they are."""

    def serialize(message: Any) -> bytes:
        return message if message.__class__ is bytes else serializer(message)

    return serialize


def _accepting_bytes(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    if not handler.response_streaming or handler.response_serializer is None:
        raise ValueError("only a response-streaming handler with a serializer can take serialized frames")
    factory: Any = (
        grpc.stream_stream_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_stream_rpc_method_handler
    )
    behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
    wrapped: grpc.RpcMethodHandler[Any, Any] = factory(
        behavior, handler.request_deserializer, serialize_or_pass(handler.response_serializer)
    )
    return wrapped


class _Registrar:
    """Stands in for the server while generated code registers a service; passes every handler on,
    the named streaming ones made to accept serialized frames too."""

    def __init__(self, server: grpc.aio.Server, methods: Collection[str]) -> None:
        self._server = server
        self._methods = methods

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The generated code's generic handler holds the unchanged handlers: the one registered in
        `add_registered_method_handlers` below replaces it."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        unknown = set(self._methods) - set(handlers)
        if unknown:
            raise ValueError(f"{service} has no method {', '.join(sorted(unknown))}")
        patched = {
            name: _accepting_bytes(handler) if name in self._methods else handler
            for name, handler in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, patched),))
        self._server.add_registered_method_handlers(service, patched)


def add_accepting_serialized(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    methods: Collection[str],
) -> None:
    """`add_to_server(servicer, server)` (a generated `add_…Servicer_to_server`), where the response
    streams of `methods` may also yield `bytes`: a frame already serialized (for instance several
    entries packed by hand into one frame), written as it is."""
    add_to_server(servicer, _Registrar(server, methods))

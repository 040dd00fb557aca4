"""A real OTLP/gRPC trace receiver for tests: what a collector (or Jaeger) would receive.

The receiver is a grpc.aio server implementing the collector's `TraceService.Export`. It runs on an
event loop of its own, in a thread of its own, so that code under test may flush its exporter
synchronously (`Telemetry.force_flush()` blocks the calling thread until the export is answered)
from the test's event loop without deadlocking against the receiver.

Use it through the `otlp_receiver` fixture; in a test module:

    from tests.otlp import otlp_receiver  # noqa: F401  (registers the fixture)

    async def test_x(otlp_receiver: OtlpReceiver) -> None:  # noqa: F811
        telemetry = setup_telemetry("svc", otlp_endpoint=otlp_receiver.endpoint)
        ...
        telemetry.force_flush()
        span = await otlp_receiver.wait_for(lambda s: s.name == "work")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.trace import SpanKind

_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: SpanKind.INTERNAL,
    trace_pb2.Span.SPAN_KIND_INTERNAL: SpanKind.INTERNAL,
    trace_pb2.Span.SPAN_KIND_SERVER: SpanKind.SERVER,
    trace_pb2.Span.SPAN_KIND_CLIENT: SpanKind.CLIENT,
    trace_pb2.Span.SPAN_KIND_PRODUCER: SpanKind.PRODUCER,
    trace_pb2.Span.SPAN_KIND_CONSUMER: SpanKind.CONSUMER,
}
_STATUSES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it. Ids are lowercase hex; a root span's parent is ""."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: SpanKind
    service_name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""
    status: str = "UNSET"
    start_time_unix_nano: int = 0
    end_time_unix_nano: int = 0


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(items: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service_name = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=_KINDS.get(span.kind, SpanKind.INTERNAL),
                        service_name=service_name,
                        attributes=_attributes(span.attributes),
                        resource=resource,
                        scope=scope_spans.scope.name,
                        status=_STATUSES.get(span.status.code, "UNSET"),
                        start_time_unix_nano=span.start_time_unix_nano,
                        end_time_unix_nano=span.end_time_unix_nano,
                    )
                )
    return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: Callable[[list[ReceivedSpan]], None]) -> None:
        self._sink = sink

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._sink(decode_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """A real OTLP/gRPC trace receiver on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._exports = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order (a snapshot)."""
        with self._lock:
            return list(self._spans)

    @property
    def exports(self) -> int:
        """How many Export calls arrived."""
        with self._lock:
            return self._exports

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def _receive(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self._exports += 1

    async def _serve(self) -> int:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self._receive), server
        )
        port = int(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        self._server = server
        return port

    async def start(self) -> str:
        """Start serving; returns the endpoint to give an OTLP exporter ("http://127.0.0.1:PORT")."""
        if self._thread is not None:
            raise RuntimeError("receiver already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="otlp-receiver", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        port = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._serve(), loop))
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        loop, thread, server = self._loop, self._thread, self._server
        if loop is None or thread is None:
            return
        try:
            if server is not None:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.stop(None), loop))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, 10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = self._server = None

    async def wait_for(
        self,
        predicate: Callable[[ReceivedSpan], bool],
        timeout: float = 10.0,
        *,
        count: int = 1,
        interval: float = 0.02,
    ) -> list[ReceivedSpan]:
        """Poll until at least `count` received spans satisfy `predicate`; return them all.

        Raises AssertionError naming what did arrive when the deadline passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            matching = [span for span in self.spans if predicate(span)]
            if len(matching) >= count:
                return matching
            if loop.time() >= deadline:
                seen = sorted({(span.service_name, span.name) for span in self.spans})
                raise AssertionError(
                    f"{len(matching)} of {count} expected spans within {timeout}s; received: {seen}"
                )
            await asyncio.sleep(interval)


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    """A started OtlpReceiver; stopped after the test."""
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()

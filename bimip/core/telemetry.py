"""OpenTelemetry for one service (X6): a tracer provider of its own, and the instrumentation bound to it.

Several services may run in one process (tests, the all-in-one runner), each with its own
`service.name`, so nothing here touches OpenTelemetry's global tracer provider and no module-level
state is created at import. Every instrumentation hook is bound explicitly to this provider:

- gRPC: the aio client interceptors of opentelemetry-instrumentation-grpc, built with
  ``tracer_provider=``, and its aio server interceptor given this provider's tracer (subclassed to
  fix coroutine-style streaming handlers, see `_AioServerInterceptor`); nothing is monkey-patched.
- SQLAlchemy: an ``EngineTracer`` attached to the given engine's ``sync_engine`` events. The
  ``SQLAlchemyInstrumentor`` itself is a process-wide singleton that instruments only on its first
  ``instrument()`` call and, on that call, also patches ``create_engine``/``Engine.connect`` for every
  engine in the process with the first caller's provider — so it is deliberately not used.
- Redis: ``RedisInstrumentor.instrument_client``, which wraps just the given client instance.

Trace context crosses process boundaries with the global *propagator* (W3C tracecontext by default),
which is stateless and shared; only the provider is per service.
"""

from __future__ import annotations

import inspect
import os
import threading
import uuid
import weakref
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import grpc
import redis.asyncio
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor
from opentelemetry.instrumentation.grpc.version import __version__ as _grpc_instrumentation_version
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.instrumentation.sqlalchemy.version import (
    __version__ as _sqlalchemy_instrumentation_version,
)
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

SERVICE_NAMESPACE = "bimip"
_SQLALCHEMY_SCOPE = "opentelemetry.instrumentation.sqlalchemy"
_GRPC_SCOPE = "opentelemetry.instrumentation.grpc"
_GRPC_SCHEMA_URL = "https://opentelemetry.io/schemas/1.11.0"


class _AioServerInterceptor(OpenTelemetryAioServerInterceptor):
    """The instrumentation's aio server interceptor, fixed for response-streaming handlers written
    with `await context.write(...)` (a coroutine, not an async generator), e.g. the standard
    health service's Watch. The stock one runs `async for` over every streaming handler and fails
    those calls with UNKNOWN ("'async for' requires an object with __aiter__ method, got
    coroutine"; open-telemetry/opentelemetry-python-contrib#3066). A coroutine handler, streaming
    or not, is awaited inside the span exactly like a unary one."""

    def _intercept_aio_server_stream(self, behavior: Any, handler_call_details: Any) -> Any:
        wrap = super()._intercept_aio_server_stream
        if inspect.iscoroutinefunction(behavior):
            wrap = self._intercept_aio_server_unary
        return wrap(behavior, handler_call_details)  # type: ignore[no-untyped-call]


class Telemetry:
    """The tracing of one service. Build it with `setup_telemetry`; call `shutdown()` when done."""

    def __init__(self, service_name: str, tracer_provider: TracerProvider, *, exporting: bool = True) -> None:
        self._service_name = service_name
        self._provider = tracer_provider
        self._exporting = exporting
        self._lock = threading.Lock()
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        self._redis_clients: weakref.WeakSet[redis.asyncio.Redis] = weakref.WeakSet()
        self._shut_down = False

    @property
    def service_name(self) -> str:
        return self._service_name

    @property
    def tracer_provider(self) -> TracerProvider:
        return self._provider

    def tracer(self, name: str, version: str | None = None) -> trace.Tracer:
        """A tracer of this service's provider, for hand-made spans (e.g. around pub/sub fan-out)."""
        return self._provider.get_tracer(name, version)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors for `grpc.aio.server(interceptors=...)`: a SERVER span per RPC and stream."""
        tracer = self._provider.get_tracer(
            _GRPC_SCOPE, _grpc_instrumentation_version, schema_url=_GRPC_SCHEMA_URL
        )
        return [_AioServerInterceptor(tracer)]  # type: ignore[no-untyped-call]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Interceptors for `grpc.aio.insecure_channel(..., interceptors=...)`: a CLIENT span per call,
        with the trace context injected into the call's metadata."""
        return list(aio_client_interceptors(tracer_provider=self._provider))  # type: ignore[no-untyped-call]

    @property
    def exporting(self) -> bool:
        """Whether spans go anywhere (an OTLP endpoint or an exporter was given)."""
        return self._exporting

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """Trace every statement the engine runs (a CLIENT span named after the statement, with
        `db.system` and the statement text). Instrumenting the same engine twice is a no-op, and
        so is instrumenting when nothing exports: statement spans are leaves, so leaving them out
        changes no trace, and their hooks add 10-50 % to each statement."""
        if not self._exporting:
            return
        sync_engine = engine.sync_engine
        with self._lock:
            if sync_engine in self._engines:
                return
            self._engines.add(sync_engine)
        tracer = self._provider.get_tracer(_SQLALCHEMY_SCOPE, _sqlalchemy_instrumentation_version)
        # The connection-usage metric goes nowhere: metrics are exported separately (X7).
        meter = NoOpMeterProvider().get_meter(_SQLALCHEMY_SCOPE)
        connections_usage = meter.create_up_down_counter("db.client.connections.usage")
        # The EngineTracer registers SQLAlchemy event listeners on the engine; it lives as long as
        # the engine does (the listeners hold it), so it is not kept here.
        EngineTracer(tracer, sync_engine, connections_usage)  # type: ignore[no-untyped-call]

    def instrument_redis(self, client: redis.asyncio.Redis) -> None:
        """Trace every command and pipeline of this one client (a CLIENT span per command).

        Only this client instance is wrapped; other clients in the process are untouched. Pub/sub
        objects made by `client.pubsub()` have their own connection and are not traced by the
        instrumentation; publish (a client command) is. Instrumenting twice is a no-op, and so is
        instrumenting when nothing exports (command spans are leaves)."""
        if not self._exporting:
            return
        with self._lock:
            if client in self._redis_clients:
                return
            self._redis_clients.add(client)
        RedisInstrumentor.instrument_client(client, tracer_provider=self._provider)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every ended span now. Blocks the calling thread while the exporter sends; from a
        coroutine whose event loop also serves the collector, run it with `asyncio.to_thread`."""
        return self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop the exporters. Idempotent. Blocks like `force_flush`."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        self._provider.shutdown()


def _otlp_exporter(endpoint: str) -> OTLPSpanExporter:
    scheme = urlsplit(endpoint).scheme
    insecure: bool | None = {"http": True, "https": False}.get(scheme)
    return OTLPSpanExporter(endpoint=endpoint, insecure=insecure)


def setup_telemetry(
    service_name: str,
    *,
    otlp_endpoint: str | None = None,
    exporter: SpanExporter | None = None,
    resource_attributes: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build the tracing of one service.

    `otlp_endpoint` (e.g. "http://jaeger:4317"; http:// means plaintext) gets spans in batches over
    OTLP/gRPC; `exporter` gets each span as it ends (tests pass an InMemorySpanExporter). With
    neither, spans would be exported nowhere, so only those whose parent arrived sampled are
    recorded (a parent-based sampler that samples no root): trace context still propagates, and the
    cost of building unexported spans is not paid. OTEL_TRACES_SAMPLER, when set, chooses instead.
    Database and Redis clients are then not instrumented at all (their spans are leaves).
    The resource carries `service.name`, `service.namespace="bimip"` and a fresh
    `service.instance.id` (so replicas are told apart), plus `resource_attributes`, which may
    override the namespace and instance id but not the service name.
    """
    if not service_name:
        raise ValueError("service_name must not be empty")
    attributes: dict[str, str] = {
        "service.namespace": SERVICE_NAMESPACE,
        "service.instance.id": uuid.uuid4().hex,
        **(resource_attributes or {}),
        "service.name": service_name,
    }
    sampler: Sampler | None = None  # None: the SDK reads OTEL_TRACES_SAMPLER (default: parent, else on)
    if not otlp_endpoint and exporter is None and not os.environ.get(OTEL_TRACES_SAMPLER):
        sampler = ParentBased(ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    if otlp_endpoint:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(service_name, provider, exporting=bool(otlp_endpoint) or exporter is not None)

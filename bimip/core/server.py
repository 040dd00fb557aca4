"""Server bootstrap shared by every service.

``start_service`` builds a service's runtime (telemetry, database engine, pub/sub bus,
revocations), a ``grpc.aio`` server with the telemetry and auth interceptors, the standard health
service (SERVING only while the database and Redis answer), reflection and the admin service, and
starts it. ``RunningService.stop`` is the graceful shutdown: health goes NOT_SERVING, the service
closes its streams, in-flight calls get the grace period, spans are flushed.

The services of one process share one Prometheus registry (``Shared.metrics``) and one ``/metrics``
endpoint on ``BIMIP_METRICS_PORT``: the first service started opens it, the last one stopped closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace.export import SpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

from bimip.admin.v1 import admin_pb2, admin_pb2_grpc
from bimip.core.auth import (
    AuthInterceptor,
    InProcessRevocations,
    Keys,
    RedisRevocations,
    Revocations,
    ServiceCredentials,
)
from bimip.core.clock import Clock, SystemClock
from bimip.core.config import CoreSettings
from bimip.core.errors import invalid
from bimip.core.metrics import Metrics, MetricsServer
from bimip.core.pubsub import Bus, InProcessBus, RedisBus
from bimip.core.pubsub import redis_client as pooled_redis
from bimip.core.storage import (
    create_engine,
    head_revision,
    migrate,
    ping,
    schema_is_current,
    schema_revision,
)
from bimip.core.telemetry import Telemetry, setup_telemetry

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Shared:
    """What the services of one process share: keys, clock, the in-process bus and revocations
    of the embedded default (so that services in one process hear each other, as over Redis), and
    the metrics with their endpoint."""

    settings: CoreSettings
    clock: Clock = field(default_factory=SystemClock)
    keys: Keys | None = None
    bus: InProcessBus | None = None
    revocations: InProcessRevocations | None = None
    metrics: Metrics = field(default_factory=Metrics)
    _metrics_server: MetricsServer | None = field(default=None, init=False, repr=False)
    _metrics_users: int = field(default=0, init=False, repr=False)
    _metrics_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = Keys.from_settings(self.settings)
        if self.settings.redis_url is None:
            self.bus = self.bus or InProcessBus(
                namespace=self.settings.redis_namespace, origin=self.settings.replica_id
            )
            self.revocations = self.revocations or InProcessRevocations()

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on while a service of this process runs (None otherwise)."""
        return self._metrics_server.port if self._metrics_server is not None else None

    async def open_metrics(self) -> None:
        """A service starts: the first one opens the /metrics endpoint (OSError if it cannot)."""
        async with self._metrics_lock:
            if self._metrics_users == 0:
                server = MetricsServer(self.metrics.registry)
                try:
                    await server.start(self.settings.host, self.settings.metrics_port)
                except OSError as exc:
                    where = f"{self.settings.host}:{self.settings.metrics_port}"
                    raise OSError(f"metrics: cannot listen on {where}: {exc}") from exc
                self._metrics_server = server
                log.info("metrics served", extra={"component": "metrics", "port": server.port})
            self._metrics_users += 1

    async def close_metrics(self) -> None:
        """A service stopped: the last one closes the endpoint."""
        async with self._metrics_lock:
            self._metrics_users -= 1
            if self._metrics_users == 0 and self._metrics_server is not None:
                server, self._metrics_server = self._metrics_server, None
                await server.stop()


@dataclass
class Runtime:
    """One service's dependencies, passed explicitly to the service's constructor."""

    name: str
    settings: CoreSettings
    clock: Clock
    keys: Keys
    telemetry: Telemetry
    engine: AsyncEngine
    bus: Bus
    revocations: Revocations
    redis: Any | None  # redis.asyncio.Redis when configured
    credentials: ServiceCredentials
    metrics: Metrics  # the process's, shared by its services
    schema_ready: bool = False  # the database was seen at the code's migration head

    async def healthy(self) -> bool:
        """The database and Redis answer, and the database schema is the one this code needs (a
        deployment's migration step may still be running: not ready until it is done)."""
        # With Redis configured, the bus's ping is the Redis check (one round trip, not two).
        checks = await asyncio.gather(ping(self.engine), self.bus.ping(), self._schema())
        return all(checks)

    async def _schema(self) -> bool:
        if not self.schema_ready:
            revision = await schema_revision(self.engine)
            self.schema_ready = schema_is_current(revision)
            if not self.schema_ready:
                log.warning(
                    "database schema not ready: run `bimip migrate`",
                    extra={"component": self.name, "revision": revision, "head": head_revision()},
                )
        return self.schema_ready

    async def close(self) -> None:
        if self.settings.redis_url is not None:
            await self.bus.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()
        # The exporter flushes synchronously; keep the event loop free while it does.
        await asyncio.to_thread(self.telemetry.shutdown)


async def build_runtime(
    name: str, shared: Shared, settings: CoreSettings, *, exporter: SpanExporter | None = None
) -> Runtime:
    assert shared.keys is not None
    telemetry = setup_telemetry(name, otlp_endpoint=settings.otlp_endpoint, exporter=exporter)
    if settings.should_migrate_on_start:
        await migrate(settings.database_url)
    engine = create_engine(settings.database_url)
    telemetry.instrument_engine(engine)
    redis_client: Any | None = None
    bus: Bus
    revocations: Revocations
    if settings.redis_url is not None:
        redis_client = pooled_redis(settings.redis_url, socket_connect_timeout=2)
        telemetry.instrument_redis(redis_client)
        bus = RedisBus(
            settings.redis_url,
            namespace=settings.redis_namespace,
            origin=settings.replica_id,
            tracer_provider=telemetry.tracer_provider,
        )
        revocations = RedisRevocations(redis_client, settings.redis_namespace)
    else:
        assert shared.bus is not None and shared.revocations is not None
        bus, revocations = shared.bus, shared.revocations
    return Runtime(
        name=name,
        settings=settings,
        clock=shared.clock,
        keys=shared.keys,
        telemetry=telemetry,
        engine=engine,
        bus=bus,
        revocations=revocations,
        redis=redis_client,
        credentials=ServiceCredentials(shared.keys, name),
        metrics=shared.metrics,
    )


class Service(Protocol):
    """What a service module provides to the bootstrap."""

    def register(self, server: grpc.aio.Server) -> Sequence[str]:
        """Add the servicers; return their full service names (for health and reflection)."""
        ...

    async def start(self) -> None:
        """Start background work (after the server listens)."""
        ...

    async def stop(self) -> None:
        """Close open streams (clients reconnect elsewhere) and stop background work."""
        ...


ServiceFactory = Callable[[Runtime], Service]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, revocations: Revocations) -> None:
        self._revocations = revocations

    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.RevokeTokenResponse:
        if not request.token_id or len(request.token_id) > 256:
            await invalid("INVALID_TOKEN_ID", "token_id must be 1..256 characters").abort(context)
        until = request.until_unix or int(time.time()) + 30 * 86400
        await self._revocations.revoke(request.token_id, float(until))
        return admin_pb2.RevokeTokenResponse()


@dataclass
class RunningService:
    name: str
    port: int
    server: grpc.aio.Server
    runtime: Runtime
    service: Service
    health: health.aio.HealthServicer
    service_names: list[str]
    auth: AuthInterceptor
    shared: Shared
    _watcher: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """Where this process serves /metrics (all its services share the endpoint)."""
        return self.shared.metrics_port

    async def stop(self, grace: float | None = None) -> None:
        grace = self.runtime.settings.shutdown_grace_s if grace is None else grace
        if self._watcher:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await self.service.stop()
        await self.server.stop(grace)
        await self.auth.stop()
        await self.runtime.close()
        await self.shared.close_metrics()
        log.info("stopped", extra={"component": self.name})


LIVENESS = "liveness"  # SERVING while the process serves at all, whatever its database and Redis


async def _set_health(running: RunningService, ok: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *running.service_names]:
        await running.health.set(name, status)


async def _watch_health(running: RunningService, current: bool) -> None:
    """Health follows the database and Redis: SERVING while both answer, NOT_SERVING otherwise."""
    while True:
        await running.runtime.clock.sleep(running.runtime.settings.health_check_interval_s)
        ok = await running.runtime.healthy()
        if ok != current:
            await _set_health(running, ok)
            log.warning("health changed", extra={"component": running.name, "serving": ok})
            current = ok


async def start_service(
    name: str,
    factory: ServiceFactory,
    shared: Shared,
    settings: CoreSettings,
    *,
    exporter: SpanExporter | None = None,
) -> RunningService:
    """Start one service on the port its settings name (`BIMIP_<NAME>_PORT`)."""
    port = int(getattr(settings, f"{name}_port"))
    runtime = await build_runtime(name, shared, settings, exporter=exporter)
    auth = AuthInterceptor(
        runtime.keys, runtime.revocations, runtime.clock, sweep_interval=settings.heartbeat_interval_s
    )
    server = grpc.aio.server(
        interceptors=[*runtime.telemetry.server_interceptors(), auth],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    service = factory(runtime)
    names = list(service.register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(runtime.revocations), server)
    names.append(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{settings.host}:{port}")
    if bound == 0:
        await runtime.close()
        raise OSError(f"{name}: cannot listen on {settings.host}:{port}")
    try:
        await shared.open_metrics()
    except OSError:
        await runtime.close()
        raise
    await server.start()
    await auth.start()
    await service.start()
    running = RunningService(name, bound, server, runtime, service, health_servicer, names, auth, shared)
    # Evaluate health once before returning, so a started service already reports its state.
    ok = await runtime.healthy()
    await _set_health(running, ok)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    running._watcher = asyncio.create_task(_watch_health(running, ok), name=f"{name}-health")
    log.info("serving", extra={"component": name, "port": bound})
    return running

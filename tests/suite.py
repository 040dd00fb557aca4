"""Start BIMIP services in the test's process, on port 0, against a test backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.sdk.trace.export import SpanExporter

from bimip.core.auth import Keys, issue_client_token
from bimip.core.clock import Clock, SystemClock
from bimip.core.config import CoreSettings, load_settings
from bimip.core.server import RunningService, Shared, start_service
from tests.conftest import Backend

JWT_SECRET = "test-jwt-secret-0123456789abcdef"
# For tests that move a fake clock by hours or days: every periodic task (heartbeats, health,
# re-checks) wakes at each of its deadlines on the way, so long intervals keep such a jump cheap.
SLOW_TIMERS = {"BIMIP_HEARTBEAT_INTERVAL_S": "300", "BIMIP_HEALTH_CHECK_INTERVAL_S": "60"}
INTERNAL_SECRET = "test-internal-secret-0123456789ab"


def suite_env(backend: Backend, var_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        **backend.env(),
        "BIMIP_VAR_DIR": str(var_dir),
        "BIMIP_JWT_SECRET": JWT_SECRET,
        "BIMIP_INTERNAL_SECRET": INTERNAL_SECRET,
        "BIMIP_MESSAGING_PORT": "0",
        "BIMIP_AWARENESS_PORT": "0",
        "BIMIP_SYNC_PORT": "0",
        "BIMIP_METRICS_PORT": "0",
        "BIMIP_MIGRATE_ON_START": "true",
        "BIMIP_SHUTDOWN_GRACE_S": "1",
    }
    env.update(extra)
    return env


@dataclass
class Suite:
    shared: Shared
    services: dict[str, RunningService]

    @property
    def keys(self) -> Keys:
        assert self.shared.keys is not None
        return self.shared.keys

    def address(self, name: str) -> str:
        return self.services[name].address

    def token(self, eid: str, device: str, ttl_s: float = 3600) -> str:
        from datetime import timedelta

        return issue_client_token(self.keys, eid, device, timedelta(seconds=ttl_s))

    def channel(self, name: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address(name))


@asynccontextmanager
async def running_suite(
    backend: Backend,
    var_dir: Path,
    names: Sequence[str] = ("messaging", "awareness", "sync"),
    *,
    clock: Clock | None = None,
    exporter: SpanExporter | None = None,
    **env: str,
) -> AsyncIterator[Suite]:
    from bimip.cli import _factories, _settings_classes

    environ = suite_env(backend, var_dir, **env)
    shared = Shared(load_settings(CoreSettings, environ), clock=clock or SystemClock())
    factories, classes = _factories(), _settings_classes()
    services: dict[str, RunningService] = {}
    try:
        for name in names:
            settings = load_settings(classes[name], environ)
            services[name] = await start_service(name, factories[name], shared, settings, exporter=exporter)  # type: ignore[arg-type]
            if name == "messaging":  # where the others reach it, now that its port is known
                environ["BIMIP_MESSAGING_ADDRESS"] = services[name].address
        yield Suite(shared, services)
    finally:
        for service in reversed(list(services.values())):
            await service.stop(grace=0.5)

"""Settings from the environment.

Every setting is a field of a pydantic model whose environment variable is ``BIMIP_`` + the field
name in upper case; the field's description is the documentation (``bimip settings`` prints the
table that README.md shows). A missing or invalid value stops start-up with an error naming the
variable. Services extend :class:`CoreSettings` with their own fields in ``services/<area>/config.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "BIMIP_"
# Standard OpenTelemetry variable, read as-is (not BIMIP_-prefixed) so operators' tooling applies.
OTLP_ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"


class ConfigError(Exception):
    """A setting is missing or invalid; the message starts with the variable's name."""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


class CoreSettings(BaseModel):
    """Settings every service reads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    database_url: str = Field(
        "sqlite+aiosqlite:///./var/bimip.db",
        description="Database: sqlite+aiosqlite:///FILE (embedded default) or postgresql+asyncpg://…",
    )
    redis_url: str | None = Field(
        None, description="Redis for pub/sub, presence and revocations (redis://…); unset = in process"
    )
    redis_namespace: str = Field(
        "bimip", description="Prefix of every Redis key and channel", min_length=1, max_length=64
    )
    host: str = Field("127.0.0.1", description="Address the gRPC servers listen on (0.0.0.0 in containers)")
    messaging_port: int = Field(50051, ge=0, le=65535, description="Messaging service port (0 = any free)")
    awareness_port: int = Field(50052, ge=0, le=65535, description="Awareness service port (0 = any free)")
    sync_port: int = Field(50053, ge=0, le=65535, description="Sync service port (0 = any free)")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Prometheus metrics port, /metrics (0 = any free)"
    )
    messaging_address: str = Field(
        "127.0.0.1:50051", description="Where awareness and sync reach messaging (host:port)"
    )
    var_dir: str = Field("./var", description="Directory for the embedded database and development secrets")
    jwt_algorithm: Literal["HS256", "RS256"] = Field(
        "HS256", description="Client token algorithm: HS256 (development) or RS256 (production)"
    )
    jwt_secret: str | None = Field(
        None,
        description="HS256 signing secret; unset = a random one kept in VAR_DIR/jwt-secret",
        min_length=32,
    )
    jwt_public_key: str | None = Field(None, description="RS256 public key: PEM text or a file path")
    jwt_private_key: str | None = Field(
        None, description="RS256 private key (PEM text or file path), only for `bimip token issue`"
    )
    jwt_issuer: str = Field("bimip", description="Expected `iss` of client tokens")
    jwt_audience: str = Field("bimip", description="Expected `aud` of client tokens")
    internal_secret: str | None = Field(
        None,
        description="Secret for service-to-service tokens; unset = random, kept in VAR_DIR/internal-secret",
        min_length=32,
    )
    heartbeat_interval_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Stream heartbeat interval; revoked or expired tokens close streams within it",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=600, description="Time given to open streams to drain on shutdown"
    )
    health_check_interval_s: float = Field(
        2.0, gt=0, le=60, description="How often health re-checks the database and Redis"
    )
    migrate_on_start: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Apply migrations at start-up; auto = only for SQLite (production runs `bimip migrate`)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This process's name in pub/sub envelopes and logs (default: host-pid)",
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/gRPC trace endpoint; read from OTEL_EXPORTER_OTLP_ENDPOINT, unset = no export"
    )

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value or None

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_migrate_on_start(self) -> bool:
        return self.migrate_on_start == "true" or (self.migrate_on_start == "auto" and self.embedded)


S = TypeVar("S", bound=CoreSettings)


def _variable_of(field: str) -> str:
    return OTLP_ENDPOINT_VARIABLE if field == "otlp_endpoint" else env_name(field)


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None) -> S:
    """Build settings from the environment (or `environ`), failing fast with the variable's name."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in cls.model_fields:
        raw = env.get(_variable_of(field))
        if raw is not None and raw != "":
            values[field] = raw
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{_variable_of(field)}: {err['msg']} (got {values.get(field)!r})")
        raise ConfigError("; ".join(problems)) from None


def check_unknown_variables(
    classes: Iterable[type[CoreSettings]], environ: Mapping[str, str] | None = None
) -> None:
    """Refuse BIMIP_* variables no settings class knows: a typo must not silently fall back to a default."""
    env = os.environ if environ is None else environ
    known = {env_name(f) for cls in classes for f in cls.model_fields}
    # Variables the test suite and tools read, not the services.
    known |= {"BIMIP_TEST_POSTGRES", "BIMIP_TEST_REDIS"}
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a known setting (see `bimip settings`)")


def settings_table(classes: Iterable[type[CoreSettings]]) -> str:
    """The Markdown table of every setting, as README.md shows it."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    seen: set[str] = set()
    for cls in classes:
        for name, info in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            default = "(derived)" if info.default_factory is not None else info.default
            shown = "unset" if default is None else f"`{default}`"
            rows.append(f"| `{_variable_of(name)}` | {shown} | {info.description or ''} |")
    return "\n".join(rows)

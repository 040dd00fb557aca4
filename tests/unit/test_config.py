from __future__ import annotations

import pytest

from bimip.core.config import (
    ConfigError,
    CoreSettings,
    check_unknown_variables,
    load_settings,
    settings_table,
)


def test_defaults_are_the_embedded_default() -> None:
    settings = load_settings(CoreSettings, {})
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.redis_url is None
    assert (settings.messaging_port, settings.awareness_port, settings.sync_port) == (50051, 50052, 50053)
    assert settings.should_migrate_on_start


def test_values_come_from_prefixed_variables() -> None:
    settings = load_settings(
        CoreSettings,
        {
            "BIMIP_MESSAGING_PORT": "6001",
            "BIMIP_DATABASE_URL": "postgresql+asyncpg://u@h/db",
            "BIMIP_REDIS_URL": "redis://h:6379/0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317",
        },
    )
    assert settings.messaging_port == 6001
    assert settings.redis_url == "redis://h:6379/0"
    assert settings.otlp_endpoint == "http://jaeger:4317"
    assert not settings.should_migrate_on_start  # production migrates with `bimip migrate`


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BIMIP_MESSAGING_PORT", "not-a-port"),
        ("BIMIP_SYNC_PORT", "70000"),
        ("BIMIP_DATABASE_URL", "mysql://x"),
        ("BIMIP_REDIS_URL", "http://x"),
        ("BIMIP_JWT_ALGORITHM", "none"),
        ("BIMIP_JWT_SECRET", "short"),
        ("BIMIP_HEARTBEAT_INTERVAL_S", "0"),
    ],
)
def test_invalid_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(CoreSettings, {variable: value})
    assert str(err.value).startswith(f"{variable}:")
    assert repr(value) in str(err.value)


def test_unknown_variable_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"^BIMIP_DATABSE_URL: not a known setting"):
        check_unknown_variables([CoreSettings], {"BIMIP_DATABSE_URL": "x", "HOME": "/root"})
    check_unknown_variables([CoreSettings], {"BIMIP_DATABASE_URL": "x"})


def test_settings_table_lists_every_variable() -> None:
    table = settings_table([CoreSettings])
    for field in CoreSettings.model_fields:
        name = "OTEL_EXPORTER_OTLP_ENDPOINT" if field == "otlp_endpoint" else f"BIMIP_{field.upper()}"
        assert f"`{name}`" in table


def test_readme_documents_every_setting() -> None:
    """README.md's settings table is the one `bimip settings` prints, so the docs match the code."""
    from pathlib import Path

    from bimip.cli import _settings_classes

    root = Path(__file__).parents[2]
    table = settings_table([CoreSettings, *_settings_classes().values()])
    assert table in (root / "README.md").read_text()
    assert table in (root / "docs" / "operations.md").read_text()  # the operator's reference too

"""Structured JSON logs joined to traces."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bimip.core.logging import configure_logging
from bimip.core.telemetry import setup_telemetry


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    err = capsys.readouterr().err
    entries = [json.loads(line) for line in err.splitlines() if line]  # every line is one JSON object
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def test_lines_are_json_with_the_base_fields_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("messaging", "info")
    log = logging.getLogger("bimip.test")
    log.info("sent %s", "m1", extra={"user": "alice@example.com", "offset": 7, "odd": object()})
    log.debug("not at INFO")

    [entry] = _lines(capsys)
    assert entry["message"] == "sent m1"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "bimip.test"
    assert entry["service"] == "messaging"
    assert entry["user"] == "alice@example.com"
    assert entry["offset"] == 7
    assert entry["odd"].startswith("<object")
    ts = datetime.fromisoformat(entry["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert "trace_id" not in entry and "span_id" not in entry


def test_a_line_inside_a_span_carries_its_trace_and_span_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("sync")
    telemetry = setup_telemetry("sync", exporter=InMemorySpanExporter())
    log = logging.getLogger("bimip.test")
    try:
        with telemetry.tracer("test").start_as_current_span("work") as span:
            log.warning("inside")
        log.warning("outside")
    finally:
        telemetry.shutdown()

    inside, outside = _lines(capsys)
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in outside


def test_exceptions_are_one_string_field_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("awareness")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("bimip.test").exception("failed")

    [entry] = _lines(capsys)
    assert entry["level"] == "ERROR"
    assert isinstance(entry["exception"], str)
    assert "ValueError: bad" in entry["exception"]


def test_configuring_twice_installs_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("messaging", "DEBUG")
    configure_logging("awareness", "WARNING")
    log = logging.getLogger("bimip.test")
    log.info("dropped")
    log.warning("once")

    [entry] = _lines(capsys)
    assert entry["message"] == "once"
    assert entry["service"] == "awareness"


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="VERBOSE"):
        configure_logging("messaging", "VERBOSE")

"""Without an exporter, spans nobody will see are not built; trace context still propagates."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bimip.core.telemetry import setup_telemetry

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _remote(sampled: bool) -> trace.Context:
    parent = SpanContext(
        TRACE_ID,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def test_without_an_exporter_roots_are_not_recorded_but_keep_a_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    tracer = setup_telemetry("sampling-test").tracer("test")
    root = tracer.start_span("root")
    assert not root.is_recording()
    assert root.get_span_context().is_valid  # a trace id to hand on all the same
    unsampled_child = tracer.start_span("child", context=_remote(sampled=False))
    assert not unsampled_child.is_recording()
    assert unsampled_child.get_span_context().trace_id == TRACE_ID


def test_without_an_exporter_a_sampled_parent_is_still_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    tracer = setup_telemetry("sampling-test").tracer("test")
    child = tracer.start_span("child", context=_remote(sampled=True))
    assert child.is_recording()
    assert child.get_span_context().trace_id == TRACE_ID
    assert child.get_span_context().trace_flags.sampled


def test_with_an_exporter_every_span_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    exporter = InMemorySpanExporter()
    tracer = setup_telemetry("sampling-test", exporter=exporter).tracer("test")
    tracer.start_span("root").end()
    assert [s.name for s in exporter.get_finished_spans()] == ["root"]


def test_otel_traces_sampler_chooses_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    tracer = setup_telemetry("sampling-test").tracer("test")
    assert tracer.start_span("root").is_recording()


async def test_without_an_exporter_statements_are_not_hooked_and_with_one_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Statement spans are leaves: with nothing exporting, the engine is left without the hooks
    (which cost on every statement); with an exporter, every statement is a span."""
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    silent, traced = create_async_engine("sqlite+aiosqlite://"), create_async_engine("sqlite+aiosqlite://")
    exporter = InMemorySpanExporter()
    quiet = setup_telemetry("sampling-test")
    loud = setup_telemetry("sampling-test", exporter=exporter)
    try:
        assert not quiet.exporting and loud.exporting
        quiet.instrument_engine(silent)
        loud.instrument_engine(traced)
        assert not silent.sync_engine.dispatch.before_cursor_execute
        assert traced.sync_engine.dispatch.before_cursor_execute
        for engine in (silent, traced):
            async with engine.connect() as conn:
                with loud.tracer("test").start_as_current_span("parent"):
                    assert (await conn.execute(text("SELECT 41 + 1"))).scalar_one() == 42
        statements = [s for s in exporter.get_finished_spans() if s.name != "parent"]
        assert len(statements) == 1  # the traced engine's SELECT, and only that
        assert statements[0].attributes is not None
        assert statements[0].attributes.get("db.statement") == "SELECT 41 + 1"
    finally:
        await silent.dispose()
        await traced.dispose()

"""The stored traceparent round-trips exactly as the W3C propagator would write and read it."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider

from services.messaging.delivery import context_of, traceparent_of


def test_traceparent_round_trip_matches_the_w3c_propagator() -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("s") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        assert traceparent_of() == carrier["traceparent"]
        context = context_of(carrier["traceparent"])
        assert context is not None
        parsed = trace.get_current_span(context).get_span_context()
        assert (parsed.trace_id, parsed.span_id) == (
            span.get_span_context().trace_id,
            span.get_span_context().span_id,
        )
        assert parsed.trace_flags.sampled and parsed.is_remote


def test_malformed_traceparents_are_ignored() -> None:
    assert traceparent_of() is None  # no current span
    for bad in (
        None,
        "",
        "01-" + "a" * 52,
        "00-" + "z" * 32 + "-" + "1" * 16 + "-01",
        "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
    ):
        assert context_of(bad) is None

"""Structured logs: one JSON object per line on stderr, joined to traces by trace_id/span_id (X6).

Each line has `ts` (ISO 8601, UTC), `level`, `logger`, `service`, `message`, the current span's
`trace_id`/`span_id` (lowercase hex, as Jaeger shows them) when a span is recording, every field
passed with `extra=`, and `exception`/`stack` as formatted text when present.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_BASE_FIELDS = ("ts", "level", "logger", "service", "message", "trace_id", "span_id")


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON. Values JSON cannot encode are written with str()."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "message": record.getMessage(),
        }
        span = trace.get_current_span()
        if span.is_recording():
            context = span.get_span_context()
            entry["trace_id"] = trace.format_trace_id(context.trace_id)
            entry["span_id"] = trace.format_span_id(context.span_id)
        # Fields from `extra=`; they cannot replace the fields above.
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _BASE_FIELDS:
                entry[key] = value
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _StderrJsonHandler(logging.Handler):
    """Writes to whatever `sys.stderr` is at the time of the call (so a redirected stderr is honored)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never take the service down
            self.handleError(record)


def _parse_level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    try:
        return levels[level.strip().upper()]
    except KeyError:
        names = ", ".join(sorted(set(levels) - {"NOTSET", "WARN", "FATAL"}))
        raise ValueError(f"unknown log level {level!r}; use one of {names}") from None


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send the root logger's records to stderr as JSON lines tagged with `service`.

    Calling it again replaces the handler it installed before (a new service name or level takes
    effect) and never adds a second one; handlers installed by others are left alone.
    """
    numeric_level = _parse_level(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrJsonHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _StderrJsonHandler()
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(numeric_level)

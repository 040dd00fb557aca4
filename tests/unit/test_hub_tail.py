"""The hub's in-memory tail of recent entries: consecutive offsets only, storage for the rest."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider

from bimip.core.pubsub import InProcessBus
from bimip.core.storage import create_engine
from services.messaging.delivery import Hub, Row

U = "u@example.com"


def _row(offset: int) -> Row:
    return Row(offset, 1, "a@example.com", "d", None, f"S{offset}", None, b"")


def _hub() -> Hub:
    hub = Hub(
        create_engine("sqlite+aiosqlite:///:memory:"),
        InProcessBus(namespace="t", origin="t"),
        TracerProvider().get_tracer("t"),
        "r",
    )
    hub.by_user[U] = set()  # a user with a stream here (the tail is kept only for those)
    return hub


def _offsets(rows: list[Row] | None) -> list[int] | None:
    return None if rows is None else [r.offset for r in rows]


def test_the_tail_serves_consecutive_entries_and_nothing_it_does_not_hold() -> None:
    hub = _hub()
    assert hub.cached(U, 0, 10) is None  # nothing known: read storage
    hub.log_grew({U: 3}, [(U, _row(1)), (U, _row(2)), (U, _row(3))])
    assert _offsets(hub.cached(U, 0, 10)) == [1, 2, 3]
    assert _offsets(hub.cached(U, 1, 1)) == [2]
    assert hub.cached(U, 3, 10) is None and hub.known_head(U) == 3  # caught up: no read needed
    hub.saw_head(U, 5)  # another replica wrote 4 and 5: they are not in memory
    assert hub.cached(U, 3, 10) is None and hub.known_head(U) == 5
    hub.log_grew({U: 7}, [(U, _row(6)), (U, _row(7))])  # a gap (4, 5 missing): the tail restarts
    assert hub.cached(U, 3, 10) is None
    assert _offsets(hub.cached(U, 5, 10)) == [6, 7]


def test_reads_extend_the_tail_and_complete_reads_set_the_head() -> None:
    hub = _hub()
    hub.remember(U, [_row(1), _row(2)], complete=True, after=0)
    assert hub.known_head(U) == 2 and _offsets(hub.cached(U, 0, 10)) == [1, 2]
    hub.remember(U, [_row(2), _row(3)])  # overlapping rows are not added twice
    assert _offsets(hub.cached(U, 0, 10)) == [1, 2, 3]
    hub.remember("other@example.com", [_row(1)])  # no stream here: not kept
    assert hub.cached("other@example.com", 0, 10) is None


def test_users_without_a_stream_keep_nothing() -> None:
    hub = _hub()
    hub.log_grew({"nobody@example.com": 1}, [("nobody@example.com", _row(1))])
    assert hub.cached("nobody@example.com", 0, 10) is None

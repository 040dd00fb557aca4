"""`timestamp` is a hand-written Timestamp.FromDatetime (it runs several times per message)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bimip.core.clock import timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _reference(at: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


@pytest.mark.parametrize(
    "at",
    [
        EPOCH,
        EPOCH - timedelta(microseconds=1),  # before the epoch: negative seconds, positive nanos
        datetime(2026, 11, 22, 5, 11, 31, 999_999, tzinfo=UTC),
        datetime(2026, 11, 22, 10, 41, 31, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 11, 22, 5, 11, 31, 250_000),  # naive counts as UTC
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_matches_from_datetime(at: datetime) -> None:
    assert timestamp(at) == _reference(at)


def test_matches_from_datetime_on_random_times() -> None:
    rng = random.Random(8)
    zones = [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=13, minutes=45))]
    for _ in range(2_000):
        at = (EPOCH + timedelta(microseconds=rng.randint(-(10**16), 10**17))).astimezone(rng.choice(zones))
        assert timestamp(at) == _reference(at), at

"""The SDK's wire statistics stay bounded for a long-running client."""

from __future__ import annotations

from bimip.sdk import Stats
from bimip.sdk.client import STATS_OFFSETS


def test_per_offset_counts_keep_only_the_latest_offsets() -> None:
    stats = Stats()
    for offset in range(1, 3 * STATS_OFFSETS + 1):
        stats.delivered(offset)
    stats.delivered(3 * STATS_OFFSETS)  # a redelivery of a kept offset
    assert stats.deliveries == 3 * STATS_OFFSETS + 1
    assert len(stats.by_offset) == STATS_OFFSETS
    assert min(stats.by_offset) == 2 * STATS_OFFSETS + 1
    assert stats.by_offset[3 * STATS_OFFSETS] == 2

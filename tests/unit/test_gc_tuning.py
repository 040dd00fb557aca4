"""`bimip run` collects cycles less often while serving (the thresholds are in BENCHMARKS.md)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from bimip.cli import GC_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_serving_collects_less_often_and_leaves_startup_objects_alone() -> None:
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLD
    assert GC_THRESHOLD[0] > 700 * 10  # far fewer first-generation collections than the default
    assert gc.get_freeze_count() > 0  # what startup built is no longer traversed

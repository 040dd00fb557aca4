"""`python -m bench.fanout`, the awareness ceiling, run for real on a small layout: every change the
star makes reaches every subscriber on every replica, in order, down the chain of relays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.awareness import Settings
from bench.fanout import run_bare_fan_out

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("replicas", [2, 3])
def test_every_change_reaches_every_subscriber_on_every_replica(replicas: int) -> None:
    settings = Settings(subscribers=21, processes=2, warmup=0.5, duration=1.5)
    metrics = run_bare_fan_out(settings, replicas=replicas)
    assert metrics["replicas"] == replicas and metrics["subscribers"] == 21
    assert metrics["to_all_samples"] > 0
    assert metrics["incomplete_changes"] == 0
    # Each subscriber checks that its k-th presence is the k-th change: none arrived out of order,
    # twice or unasked for, and none went to the star.
    assert metrics["frames"] == {}
    assert metrics["to_each_samples"] == 21 * metrics["to_all_samples"]
    assert 0 < metrics["to_all_p50_ms"] <= metrics["to_all_p99_ms"]


def test_the_command_prints_the_latency_run() -> None:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.fanout", "--replicas", "1", "--subscribers", "10"),
            *("--processes", "1", "--warmup", "0.5", "--duration", "1"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    printed = json.loads(done.stdout)
    assert printed["replicas"] == 1 and printed["incomplete_changes"] == 0 and printed["to_all_samples"] > 0

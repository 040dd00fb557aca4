"""`python -m bench.messaging --rate`: paced runs at fixed rates, run for real on a small workload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fixed_rates_are_run_in_place_of_the_peak(tmp_path: Path) -> None:
    output = tmp_path / "messaging.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.messaging",
            *("--users", "4", "--processes", "1", "--warmup", "0.5", "--duration", "2"),
            *("--rate", "20", "--rate", "40", "--output", str(output)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    scenarios = json.loads(output.read_text())["scenarios"]
    assert list(scenarios) == ["echo", "messaging embedded paced 20/s", "messaging embedded paced 40/s"]
    for rate in (20, 40):
        run = scenarios[f"messaging embedded paced {rate}/s"]
        assert run["target_per_s"] == rate
        assert abs(run["delivered_per_s"] - rate) <= rate * 0.25  # 2 s windows: a few messages either way
        assert run["incomplete"] == 0
        assert run["delivered_samples"] > 0
        # At least a send, its SENT, two deliveries and the mirror copy per message, and the acks.
        assert 5 < run["frames_per_message"] < 40
        assert run["frames_per_s"] > 5 * run["delivered_per_s"]

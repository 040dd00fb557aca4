"""The benchmark harness's own logic: targets are judged from the measured figures, the table says
which are met, and the plots are drawn from the results (the runs themselves are `make bench`)."""

from __future__ import annotations

from pathlib import Path

from bench.__main__ import plots, target_table, targets

RESULTS = {
    "echo peak": {"round_trips_per_s": 7000.0, "round_trip_p99_ms": 40.0},
    "echo paced 50%": {"target_per_s": 3500.0, "round_trips_per_s": 3500.0, "round_trip_p99_ms": 10.0},
    "messaging embedded peak": {
        "delivered_per_s": 700.0,
        "delivered_p99_ms": 900.0,
        "server_cpu_cores": 0.7,
        "frames_per_s": 4200.0,
        "frames_per_message": 6.0,
    },
    "messaging embedded paced 50%": {
        "target_per_s": 350.0,
        "delivered_per_s": 350.0,
        "delivered_p99_ms": 11.0,
    },
    "idle embedded": {"streams_open": 10_000, "kb_per_stream": 42.0},
    "awareness bare 1× fan-out latency": {"replicas": 1, "to_all_p99_ms": 40.0},
    "awareness embedded latency": {"replicas": 1, "to_all_p99_ms": 45.0, "to_all_p99_vs_bare": 1.125},
    "sync embedded 10,000 behind on 10,000": {
        "behind": 10_000,
        "log_entries": 10_000,
        "entries_per_s": 40_000.0,
        "time_to_head_s": 0.25,
        "time_vs_smallest_log": 1.0,
    },
    "sync embedded 10,000 behind on 100,000": {
        "behind": 10_000,
        "log_entries": 100_000,
        "entries_per_s": 45_000.0,
        "time_to_head_s": 0.4,
        "time_vs_smallest_log": 1.6,
    },
    "sync embedded 10,000 behind on 1,000,000": {
        "behind": 10_000,
        "log_entries": 1_000_000,
        "entries_per_s": 60_000.0,
        "time_to_head_s": 0.3,
        "time_vs_smallest_log": 1.3,
    },
}


def test_each_target_is_judged_from_the_figures() -> None:
    judged = {t.what: (round(t.measured or 0, 3), t.met) for t in targets(RESULTS, ("embedded",))}
    assert judged["messaging embedded: delivered msgs/s ÷ echo round trips/s"] == (0.1, False)
    assert judged["messaging embedded: server CPU per delivered message"] == (1000.0, None)
    assert judged["messaging embedded: frames on the wire per delivered message (the echo: 2)"] == (6.0, None)
    assert judged["messaging embedded: frames/s ÷ echo frames/s (2 per round trip)"] == (0.3, None)
    assert judged["messaging embedded: p99 send→delivered at half peak ÷ echo p99 at half peak"] == (
        1.1,
        True,
    )
    assert judged["idle embedded: device streams held by one messaging process"] == (10_000, True)
    assert judged["idle embedded: memory per idle stream"] == (42.0, False)
    assert judged["awareness embedded: a change reaches all subscribers, p99"] == (45.0, True)
    assert judged["awareness bare 1× fan-out (embedded's layout): a change reaches all subscribers, p99"] == (
        40.0,
        None,
    )
    assert judged["awareness embedded: p99 to all ÷ the bare fan-out's"] == (1.125, None)
    assert judged["sync embedded: entries/s during catch-up (slowest case)"] == (40_000.0, False)
    assert judged["sync embedded: 10,000 behind on 1,000,000 ÷ on the smallest log"] == (1.3, False)
    table = target_table(targets(RESULTS, ("embedded",)))
    assert "| idle embedded: memory per idle stream | 42 KB | ≤ 30 KB | **no** |" in table


def test_a_short_idle_run_is_not_judged_on_the_count() -> None:
    short = {"idle embedded": {"streams_requested": 2_000, "streams_open": 2_000, "kb_per_stream": 20.0}}
    judged = {t.what: (t.met, t.goal) for t in targets(short, ("embedded",))}
    assert judged["idle embedded: device streams held by one messaging process"] == (
        None,
        "≥ 10,000 (this run asked 2,000)",
    )
    assert judged["idle embedded: memory per idle stream"] == (True, "≤ 30")


def test_a_short_awareness_run_is_not_judged() -> None:
    short = {"awareness embedded latency": {"replicas": 1, "subscribers": 500, "to_all_p99_ms": 40.0}}
    (row,) = targets(short, ("embedded",))
    assert (row.met, row.goal) == (None, "≤ 50 (this run had 500 subscribers)")


def test_two_replicas_are_reported_against_one() -> None:
    results = {"replicas scale 2× messaging peak": {"delivered_per_s": 250.0, "vs_one_replica": 0.5}}
    (row,) = targets(results, ("scale",))
    assert (row.what, row.measured, row.met) == (
        "messaging scale: 2 replicas ÷ 1 replica, delivered msgs/s",
        0.5,
        None,
    )


def test_a_scenario_not_run_has_no_target() -> None:
    assert targets({"echo peak": RESULTS["echo peak"]}, ("embedded", "scale")) == []


def test_plots_are_drawn_from_the_results(tmp_path: Path) -> None:
    written = plots(RESULTS, tmp_path)
    assert [p.name for p in written] == ["messaging.png", "sync.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 10_000 for p in written)

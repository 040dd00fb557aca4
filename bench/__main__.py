"""The benchmark harness: every scenario, next to the bare gRPC ceiling measured in the same run.

    python -m bench                         # quick (under 3 minutes): the embedded default
    python -m bench --full                  # every scenario on both backends, reference durations
    python -m bench --only messaging idle   # scenarios by name: echo messaging idle awareness sync
    python -m bench --list

`make bench` runs the quick profile and `make bench-full` the full one. Each scenario runs the real
services as processes (`bimip run …`, bench/services.py) and drives them from client processes of
their own (bench/common.py `run_clients`), so the load generator never shares the service's event
loop. The echo ceiling (bench/echo.py) uses the messaging scenario's workload: same message size,
streams and process layout. The quick profile shortens the measured windows (its figures are for
quick feedback); the headline figures in BENCHMARKS.md come from `--full`, whose messaging runs use
the reference workload exactly (3 s warm-up, 20 s measured).

Output: a progress line per step, a table of the targets (measured, target, met), the JSON report
`bench/results/latest.json` (scenario → metric → value, with the machine, versions and command)
and PNG plots in bench/results/ (throughput and latency against load, cost against log size).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import awareness as aw_bench
from bench import sync as sync_bench
from bench.common import Workload, machine_info
from bench.echo import run_echo
from bench.messaging import run_messaging
from bench.services import running

RESULTS = Path(__file__).parent / "results"
SCENARIOS = ("echo", "messaging", "replicas", "idle", "awareness", "sync")


@dataclass(frozen=True)
class Profile:
    name: str
    backends: tuple[str, ...]
    workload: Workload
    paces: tuple[float, ...]  # messaging and echo runs paced at these fractions of their peak
    awareness: aw_bench.Settings
    sync_logs: tuple[int, ...]
    sync_behind: tuple[int, ...]
    sync_repeat: int
    idle_streams: int
    awareness_peak: bool = True  # the peak run (changes outstanding) after the latency run


QUICK = Profile(
    "quick",
    ("embedded",),
    Workload(warmup=2.0, duration=6.0),
    (0.5,),
    aw_bench.Settings(subscribers=500, warmup=1.0, duration=4.0),
    (10_000, 50_000),
    (10_000,),
    1,
    2_000,  # opening streams runs at about 90/s here: 10,000 take the full profile's 2 minutes
    awareness_peak=False,
)
FULL = Profile(
    "full",
    ("embedded", "scale"),
    Workload(),  # the reference workload, exactly
    (0.25, 0.5, 0.75),
    aw_bench.Settings(),
    (10_000, 100_000, 1_000_000),
    (10_000, 100_000),
    3,
    10_000,
)


class Progress:
    """One line per step, with the time since the run began."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {text}", flush=True)


Results = dict[str, dict[str, Any]]


def _short(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict | list)})


def run_echo_scenario(profile: Profile, say: Progress) -> Results:
    """The bare grpc.aio bidirectional echo: the ceiling, closed loop and paced."""
    results: Results = {}
    say("echo: closed loop (the ceiling)")
    peak = results["echo peak"] = run_echo(profile.workload)
    say(f"echo peak: {_short(peak)}")
    for fraction in profile.paces:
        name = f"echo paced {fraction:.0%}"
        results[name] = run_echo(profile.workload, peak["round_trips_per_s"] * fraction)
        say(f"{name}: {_short(results[name])}")
    return results


def run_messaging_scenario(profile: Profile, say: Progress) -> Results:
    """Messaging 1:1, two devices per user: closed-loop peak, then paced fractions of it."""
    results: Results = {}
    for backend in profile.backends:
        with running(backend, [["messaging"]]) as server:
            say(f"messaging {backend}: closed loop")
            peak = results[f"messaging {backend} peak"] = run_messaging(server, profile.workload, "u", None)
            say(f"messaging {backend} peak: {_short(peak)}")
            for i, fraction in enumerate(profile.paces):
                if peak["delivered_per_s"] <= 0:
                    break
                name = f"messaging {backend} paced {fraction:.0%}"
                rate = peak["delivered_per_s"] * fraction
                results[name] = run_messaging(server, profile.workload, f"p{i}x", rate)
                say(f"{name}: {_short(results[name])}")
    return results


def run_replicas_scenario(profile: Profile, say: Progress) -> Results:
    """Two messaging replicas on PostgreSQL + Redis against one: partners on different replicas."""
    results: Results = {}
    for replicas in (1, 2):
        with running("scale", [["messaging"]] * replicas) as server:
            say(f"replicas: {replicas} messaging process(es), closed loop")
            name = f"replicas scale {replicas}× messaging peak"
            results[name] = run_messaging(server, profile.workload, f"r{replicas}x", None)
            say(f"{name}: {_short(results[name])}")
    one, two = (results[f"replicas scale {n}× messaging peak"]["delivered_per_s"] for n in (1, 2))
    results["replicas scale 2× messaging peak"]["vs_one_replica"] = round(two / one, 3) if one else 0.0
    return results


def run_idle_scenario(profile: Profile, say: Progress) -> Results:
    """Idle device streams held by one messaging process, and memory per stream."""
    from bench.idle import run_idle

    results: Results = {}
    for backend in profile.backends:
        say(f"idle {backend}: opening {profile.idle_streams:,} device streams on one messaging process")
        results[f"idle {backend}"] = run_idle(backend, profile.idle_streams)
        say(f"idle {backend}: {_short(results[f'idle {backend}'])}")
    return results


def run_awareness_scenario(profile: Profile, say: Progress) -> Results:
    """A status change fanned out to 1,000 subscribers (two replicas on PostgreSQL + Redis), next
    to the bare grpc.aio fan-out with the same layout."""
    results: Results = {}
    settings = profile.awareness
    eids = aw_bench.subscriber_eids(settings.subscribers)
    runs = (("latency", 1), ("peak", settings.window)) if profile.awareness_peak else (("latency", 1),)
    ceilings: dict[int, dict[str, Any]] = {}
    for backend in profile.backends:
        say(f"awareness {backend}: the bare fan-out, then {len(eids):,} subscribers approve and the runs")
        results |= aw_bench.run_backend(backend, settings, eids, runs, say, ceilings)
    return results


def run_sync_scenario(profile: Profile, say: Progress) -> Results:
    """Sync catch-up on small and large logs, and snapshots at the head."""
    results: Results = {}
    for backend in profile.backends:
        say(f"sync {backend}: logs of {', '.join(f'{n:,}' for n in profile.sync_logs)} entries")
        results |= sync_bench.run_backend(
            backend, list(profile.sync_logs), list(profile.sync_behind), 1000, profile.sync_repeat
        )
    return results


RUNNERS: dict[str, Callable[[Profile, Progress], Results]] = {
    "echo": run_echo_scenario,
    "messaging": run_messaging_scenario,
    "replicas": run_replicas_scenario,
    "idle": run_idle_scenario,
    "awareness": run_awareness_scenario,
    "sync": run_sync_scenario,
}
QUICK_SKIPS = ("replicas",)  # needs PostgreSQL + Redis: in --full, or asked for with --only


# --- targets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    measured: float | None
    goal: str
    met: bool | None
    unit: str = ""


def targets(results: Results, backends: tuple[str, ...]) -> list[Target]:
    """The issue's targets, each as a ratio or a figure, from whatever the run measured."""
    out: list[Target] = []
    echo = results.get("echo peak")
    echo_half = results.get("echo paced 50%")
    for backend in backends:
        peak = results.get(f"messaging {backend} peak")
        half = results.get(f"messaging {backend} paced 50%")
        if peak and echo:
            ratio = peak["delivered_per_s"] / echo["round_trips_per_s"]
            out.append(
                Target(
                    f"messaging {backend}: delivered msgs/s ÷ echo round trips/s",
                    ratio,
                    "≥ 0.35",
                    ratio >= 0.35,
                )
            )
            if peak.get("frames_per_message"):
                # The ratio above is (frames/s ÷ the echo's 2 frames per round trip) × (2 ÷ frames
                # per message): how near gRPC's own rate the service moves frames, and how many
                # frames the protocol needs per message.
                out.append(
                    Target(
                        f"messaging {backend}: frames on the wire per delivered message (the echo: 2)",
                        peak["frames_per_message"],
                        "(reported)",
                        None,
                    )
                )
                out.append(
                    Target(
                        f"messaging {backend}: frames/s ÷ echo frames/s (2 per round trip)",
                        peak["frames_per_s"] / (2 * echo["round_trips_per_s"]),
                        "(reported)",
                        None,
                    )
                )
            if peak["delivered_per_s"]:
                cpu = peak["server_cpu_cores"] / peak["delivered_per_s"] * 1e6
                out.append(
                    Target(
                        f"messaging {backend}: server CPU per delivered message",
                        cpu,
                        "(reported)",
                        None,
                        "µs",
                    )
                )
        if half and echo_half:
            ratio = half["delivered_p99_ms"] / echo_half["round_trip_p99_ms"]
            out.append(
                Target(
                    f"messaging {backend}: p99 send→delivered at half peak ÷ echo p99 at half peak",
                    ratio,
                    "≤ 1.2",
                    ratio <= 1.2,
                )
            )
        idle = results.get(f"idle {backend}")
        if idle:
            asked = idle.get("streams_requested", idle["streams_open"])
            held = idle["streams_open"]
            out.append(
                Target(
                    f"idle {backend}: device streams held by one messaging process",
                    held,
                    "≥ 10,000" if asked >= 10_000 else f"≥ 10,000 (this run asked {asked:,})",
                    held >= 10_000 if asked >= 10_000 else None,
                )
            )
            out.append(
                Target(
                    f"idle {backend}: memory per idle stream",
                    idle["kb_per_stream"],
                    "≤ 30",
                    idle["kb_per_stream"] <= 30,
                    "KB",
                )
            )
        latency = results.get(f"awareness {backend} latency")
        if latency:
            full = latency.get("subscribers", 1000) >= 1000  # the target is for 1,000 subscribers
            out.append(
                Target(
                    f"awareness {backend}: a change reaches all subscribers, p99",
                    latency["to_all_p99_ms"],
                    "≤ 50" if full else f"≤ 50 (this run had {latency['subscribers']:,} subscribers)",
                    latency["to_all_p99_ms"] <= 50 if full else None,
                    "ms",
                )
            )
            bare = results.get(f"awareness bare {latency['replicas']}× fan-out latency")
            if bare:
                out.append(
                    Target(
                        f"awareness bare {latency['replicas']}× fan-out ({backend}'s layout): "
                        "a change reaches all subscribers, p99",
                        bare["to_all_p99_ms"],
                        "(ceiling)",
                        None,
                        "ms",
                    )
                )
            if "to_all_p99_vs_bare" in latency:
                out.append(
                    Target(
                        f"awareness {backend}: p99 to all ÷ the bare fan-out's",
                        latency["to_all_p99_vs_bare"],
                        "(reported)",
                        None,
                    )
                )
        catchups = [m for name, m in results.items() if name.startswith(f"sync {backend} ") and "behind" in m]
        if catchups:
            slowest = min(m["entries_per_s"] for m in catchups)
            out.append(
                Target(
                    f"sync {backend}: entries/s during catch-up (slowest case)",
                    slowest,
                    "≥ 50,000",
                    slowest >= 50_000,
                )
            )
            big = [m for m in catchups if m["behind"] == 10_000 and "time_vs_smallest_log" in m]
            if len(big) > 1:
                largest = max(big, key=lambda m: m["log_entries"])
                ratio = largest["time_vs_smallest_log"]
                out.append(
                    Target(
                        f"sync {backend}: 10,000 behind on {largest['log_entries']:,} ÷ on the smallest log",
                        ratio,
                        "≤ 1.2",
                        ratio <= 1.2,
                    )
                )
    two = results.get("replicas scale 2× messaging peak")
    if two and "vs_one_replica" in two:
        out.append(
            Target(
                "messaging scale: 2 replicas ÷ 1 replica, delivered msgs/s",
                two["vs_one_replica"],
                "(reported)",
                None,
            )
        )
    return out


def target_table(rows: list[Target]) -> str:
    lines = ["| target | measured | goal | met |", "| --- | ---: | ---: | :---: |"]
    for t in rows:
        value = (
            "—" if t.measured is None else (f"{t.measured:,.3f}" if t.measured < 10 else f"{t.measured:,.0f}")
        )
        met = {True: "yes", False: "**no**", None: "—"}[t.met]
        goal = t.goal if t.met is None else f"{t.goal} {t.unit}"
        lines.append(f"| {t.what} | {value} {t.unit} | {goal} | {met} |")
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------


def plots(results: Results, directory: Path) -> list[Path]:
    """Throughput and latency against offered load (messaging and echo), cost against log size (sync)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    series: dict[str, list[dict[str, Any]]] = {}
    for name, m in results.items():
        if name.startswith(("messaging ", "echo ")):
            series.setdefault(re.sub(r" (peak|paced \d+%)$", "", name), []).append(m)
    if series:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for label, points in sorted(series.items()):
            rows = sorted(points, key=lambda m: m.get("target_per_s", float("inf")))
            done = [m.get("delivered_per_s", m.get("round_trips_per_s", 0)) for m in rows]
            offered = [m.get("target_per_s", d) for m, d in zip(rows, done, strict=True)]
            p99 = [m.get("delivered_p99_ms", m.get("round_trip_p99_ms", 0)) for m in rows]
            left.plot(offered, done, marker="o", label=label)
            right.plot(done, p99, marker="o", label=label)
        left.set(
            xlabel="offered load (msgs/s; the last point is the closed-loop peak)",
            ylabel="delivered msgs/s",
            title="Throughput against load",
        )
        right.set(
            xlabel="delivered msgs/s",
            ylabel="p99 send→delivered (echo: round trip) ms",
            title="Latency against load",
            yscale="log",
        )
        left.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "messaging.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    catchups = [m for name, m in results.items() if name.startswith("sync ") and "behind" in m]
    if catchups:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for name, m in results.items():
            if name.startswith("sync ") and "behind" in m:
                groups.setdefault((name.split()[1], m["behind"]), []).append(m)
        for (backend, behind), points in sorted(groups.items()):
            points.sort(key=lambda m: m["log_entries"])
            ax.plot(
                [m["log_entries"] for m in points],
                [m["time_to_head_s"] for m in points],
                marker="o",
                label=f"{backend}, {behind:,} behind",
            )
        ax.set(
            xscale="log",
            xlabel="log size (entries)",
            ylabel="catch-up time s",
            title="Sync catch-up cost against log size",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "sync.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="both backends, reference durations")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, metavar="NAME", help="these scenarios only")
    parser.add_argument("--backend", choices=("embedded", "scale", "both"), help="override the profile's")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    if args.list:
        for name in SCENARIOS:
            print(f"{name:<10} {(RUNNERS[name].__doc__ or '').strip()}")
        return 0
    profile = FULL if args.full else QUICK
    if args.backend:
        profile = replace(
            profile, backends=("embedded", "scale") if args.backend == "both" else (args.backend,)
        )
    chosen = [
        name
        for name in SCENARIOS
        if (name in args.only if args.only else profile.name == "full" or name not in QUICK_SKIPS)
    ]
    if {"messaging", "replicas"} & set(chosen) and "echo" not in chosen:
        chosen.insert(0, "echo")  # the ceiling is measured in the same run, always
    say = Progress()
    say(f"profile {profile.name}, backends {', '.join(profile.backends)}, scenarios {', '.join(chosen)}")
    results: Results = {}
    for name in chosen:
        results |= RUNNERS[name](profile, say)
    rows = targets(results, profile.backends)
    print()
    print(target_table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info([Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]),
        "profile": profile.name,
        "scenarios": results,
        "targets": [t.__dict__ for t in rows],
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    for path in plots(results, args.output.parent):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sync catch-up: a device far behind streams the delta to the head, on small and large logs.

    python -m bench.sync [--backend embedded|scale|both] [--logs 10000,100000,1000000]
                         [--behind 10000,100000] [--page-size 1000] [--repeat 3]

Messaging and sync run in their own processes (`bimip run messaging`, `bimip run sync`), sync
reading through messaging's LogLink as in production. One user per log size gets a log of that many
entries, written straight into messaging's tables before the runs (100-byte messages from another
user; writing a million entries through the API would take longer than the benchmark). A device of
that user then catches up from `head - behind` with StreamDelta (pages of `--page-size`), and the
client counts the entries and checks they are contiguous. Reported per (log size, behind): time to
head, entries per second, the service CPU used, and the time relative to the same catch-up on the
smallest log. Each catch-up runs `--repeat` times; the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import insert, text

from bench.common import cpu_seconds, machine_info
from bench.services import DOMAIN, Suite, running
from bimip.common.v1 import common_pb2
from bimip.core.clock import timestamp
from bimip.core.storage import create_engine
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc
from services.messaging import store

RESULTS = Path(__file__).parent / "results" / "sync.json"
WRITER = f"writer@{DOMAIN}"
FILL_BATCH = 20_000


def reader(size: int) -> str:
    return f"r{size}@{DOMAIN}"


async def fill(database_url: str, sizes: list[int]) -> float:
    """Write a log of each size for its reader; returns the seconds it took."""
    started = time.monotonic()
    engine = create_engine(database_url, writer=True)
    now = datetime.now(UTC)
    payload = b"p" * 100
    try:
        for size in sizes:
            eid = reader(size)
            for start in range(1, size + 1, FILL_BATCH):
                rows = []
                for offset in range(start, min(size, start + FILL_BATCH - 1) + 1):
                    signal_id = f"{size:07d}{offset:019d}"[-26:]
                    message = common_pb2.Message(
                        client_id=f"c{offset}",
                        signal_id=signal_id,
                        sender=common_pb2.Identity(eid=WRITER, device_id="w1"),
                        recipient=common_pb2.Identity(eid=eid),
                        type=common_pb2.MESSAGE_TYPE_CHAT,
                        payload=payload,
                        server_time=timestamp(now),
                    )
                    entry = common_pb2.Entry(
                        offset=offset,
                        peer_eid=WRITER,
                        author=common_pb2.Identity(eid=WRITER, device_id="w1"),
                        created_at=timestamp(now),
                        message=message,
                    )
                    rows.append(
                        {
                            "eid": eid,
                            "offset": offset,
                            "kind": store.KIND_MESSAGE,
                            "peer_eid": WRITER,
                            "author_eid": WRITER,
                            "author_device": "w1",
                            "target_device": None,
                            "signal_id": signal_id,
                            "created_at": now,
                            "trace_context": None,
                            "body": entry.SerializeToString(),
                        }
                    )
                async with engine.begin() as conn:
                    await conn.execute(insert(store.entries), rows)
            async with engine.begin() as conn:
                await conn.execute(insert(store.logs), [{"eid": eid, "head": size, "first_offset": 1}])
        if engine.dialect.name == "postgresql":  # statistics, as autovacuum would gather them
            async with engine.begin() as conn:
                await conn.execute(text("ANALYZE messaging_entries"))
    finally:
        await engine.dispose()
    return time.monotonic() - started


async def catch_up(address: str, token: str, since: int, page_size: int) -> tuple[float, int]:
    """Stream everything after `since`; returns (seconds to the head, entries received)."""
    async with grpc.aio.insecure_channel(
        address, options=(("grpc.max_receive_message_length", 64 << 20),)
    ) as ch:
        stub = sync_pb2_grpc.SyncServiceStub(ch)
        request = sync_pb2.StreamDeltaRequest(since_version=since, page_size=page_size)
        expected, count, head = since + 1, 0, -1
        started = time.monotonic()
        async for response in stub.StreamDelta(request, metadata=(("authorization", f"Bearer {token}"),)):
            page = response.page
            for entry in page.entries:
                if entry.offset != expected:
                    raise RuntimeError(f"expected offset {expected}, got {entry.offset}")
                expected += 1
            count += len(page.entries)
            head = page.head
        elapsed = time.monotonic() - started
    if expected - 1 != head:
        raise RuntimeError(f"stopped at {expected - 1}, the head is {head}")
    return elapsed, count


def run_backend(
    backend: str, sizes: list[int], behinds: list[int], page_size: int, repeat: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # No automatic checkpoint during the catch-ups: the first one folds the whole log in the
    # background and would run alongside them. Snapshots are measured on their own below.
    quiet = {"BIMIP_CHECKPOINT_EVERY_ENTRIES": "10000000", "BIMIP_CHECKPOINT_EVERY_S": "2592000"}
    with running(backend, [["messaging"], ["sync"]], quiet) as suite:
        filled = asyncio.run(fill(suite.env["BIMIP_DATABASE_URL"], sizes))
        print(f"{backend}: wrote {sum(sizes):,} entries in {filled:.1f} s", flush=True)
        address = suite.addresses("sync")[0]
        for behind in behinds:
            for size in sizes:
                if behind > size:
                    continue
                results[f"sync {backend} {behind:,} behind on {size:,}"] = _measure(
                    suite, address, size, behind, page_size, repeat
                )
                name = f"sync {backend} {behind:,} behind on {size:,}"
                print(f"{name}: {json.dumps(results[name])}", flush=True)
        for size in sizes:
            name = f"snapshot {backend} at the head of {size:,}"
            results[name] = asyncio.run(_snapshots(suite, address, size))
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    for behind in behinds:
        base = [m for m in results.values() if m.get("behind") == behind]
        if base:
            smallest = min(base, key=lambda m: m["log_entries"])
            for m in base:
                m["time_vs_smallest_log"] = round(m["time_to_head_s"] / smallest["time_to_head_s"], 3)
    return results


def _measure(
    suite: Suite, address: str, size: int, behind: int, page_size: int, repeat: int
) -> dict[str, Any]:
    token = suite.token(reader(size), "d1")
    times: list[float] = []
    cpu = 0.0
    for _ in range(repeat):
        before = sum(cpu_seconds(pid) for pid in suite.pids)
        elapsed, count = asyncio.run(catch_up(address, token, size - behind, page_size))
        cpu += sum(cpu_seconds(pid) for pid in suite.pids) - before
        if count != behind:
            raise RuntimeError(f"received {count} entries, expected {behind}")
        times.append(elapsed)
    median = statistics.median(times)
    return {
        "log_entries": size,
        "behind": behind,
        "time_to_head_s": round(median, 3),
        "entries_per_s": round(behind / median, 1),
        "runs_s": [round(t, 3) for t in times],
        "server_cpu_s_per_run": round(cpu / repeat, 3),
    }


async def _snapshots(suite: Suite, address: str, size: int) -> dict[str, Any]:
    """GetSnapshot at the head with no checkpoint (the whole log folded), then again (stored)."""
    metadata = (("authorization", f"Bearer {suite.token(reader(size), 'd1')}"),)
    async with grpc.aio.insecure_channel(
        address, options=(("grpc.max_receive_message_length", 64 << 20),)
    ) as ch:
        stub = sync_pb2_grpc.SyncServiceStub(ch)
        times = []
        for _ in range(2):
            started = time.monotonic()
            answer = await stub.GetSnapshot(sync_pb2.GetSnapshotRequest(), metadata=metadata, timeout=600)
            times.append(time.monotonic() - started)
    (conversation,) = answer.snapshot.conversations
    if answer.snapshot.version != size or conversation.unread_count != size:
        raise RuntimeError(f"unexpected snapshot: version {answer.snapshot.version}")
    return {"log_entries": size, "first_s": round(times[0], 3), "stored_s": round(times[1], 3)}


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | log entries | behind | time to head s | entries/s | vs smallest log | service CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in scenarios.items():
        if "behind" not in m:
            continue
        lines.append(
            f"| {name} | {m['log_entries']:,} | {m['behind']:,} | {m['time_to_head_s']:.3f} "
            f"| {m['entries_per_s']:,.0f} | {m.get('time_vs_smallest_log', 1):.3f} "
            f"| {m['server_cpu_s_per_run']:.2f} |"
        )
    lines += ["", "| snapshot at the head | log entries | first (no checkpoint) s | again (stored) s |"]
    lines += ["| --- | ---: | ---: | ---: |"]
    for name, m in scenarios.items():
        if "first_s" in m:
            lines.append(f"| {name} | {m['log_entries']:,} | {m['first_s']:.2f} | {m['stored_s']:.2f} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return sorted(int(x.replace("_", "")) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("embedded", "scale", "both"), default="embedded")
    parser.add_argument("--logs", type=_ints, default=[10_000, 100_000, 1_000_000], help="log sizes")
    parser.add_argument("--behind", type=_ints, default=[10_000, 100_000], help="entries to catch up")
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    machine = machine_info([Path(sys.executable).name, "-m", "bench.sync", *sys.argv[1:]])
    scenarios: dict[str, Any] = {}
    for backend in ("embedded", "scale") if args.backend == "both" else (args.backend,):
        scenarios |= run_backend(backend, args.logs, args.behind, args.page_size, args.repeat)
    print()
    print(table(scenarios))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {"logs": args.logs, "behind": args.behind, "page_size": args.page_size, "repeat": args.repeat}
    report = {"machine": machine, "settings": settings, "scenarios": scenarios}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

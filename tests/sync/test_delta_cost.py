"""SPEC S2: a delta's cost grows with the delta, not with the log. Every read of a log (deltas,
hellos, snapshots, live delivery) runs one query; on a log of 20,000 entries its plan is a range
of the primary key that reads only the page, wherever in the log the page starts."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bimip.core.storage import create_engine, migrate
from services.messaging import store
from services.messaging.delivery import read_log_query
from tests.conftest import Backend

BIG, SMALL = "big@example.com", "small@example.com"
ENTRIES, PAGE = 20_000, 500


async def _fill(engine: AsyncEngine) -> None:
    now = datetime.now(UTC)

    def row(eid: str, offset: int) -> dict[str, object]:
        return {
            "eid": eid,
            "offset": offset,
            "kind": 1,
            "peer_eid": SMALL if eid == BIG else BIG,
            "author_eid": BIG,
            "author_device": "d1",
            "target_device": None,
            "signal_id": f"{eid[:3]}{offset:020d}",
            "created_at": now,
            "trace_context": None,
            "body": b"x" * 64,
        }

    async with engine.begin() as conn:
        await conn.execute(insert(store.entries), [row(BIG, o) for o in range(1, ENTRIES + 1)])
        await conn.execute(insert(store.entries), [row(SMALL, o) for o in range(1, 1001)])


async def test_a_delta_reads_its_page_not_the_log(backend: Backend) -> None:
    await migrate(backend.database_url)
    engine = create_engine(backend.database_url)
    try:
        await _fill(engine)
        for after in (0, ENTRIES // 2, ENTRIES - PAGE):
            query = read_log_query(BIG, after, PAGE, upto=ENTRIES)
            sql = str(query.compile(engine.sync_engine, compile_kwargs={"literal_binds": True}))
            async with engine.connect() as conn:
                if engine.dialect.name == "postgresql":
                    await conn.execute(text("ANALYZE messaging_entries"))
                    (plan,) = (await conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"))).scalar_one()
                    scans = [n for n in _nodes(plan["Plan"]) if "Scan" in str(n["Node Type"])]
                    assert scans and all("Seq" not in str(n["Node Type"]) for n in scans), plan
                    # Rows read: the page, not the 20,000 (an index or bitmap scan of the key range).
                    assert all(n["Actual Rows"] == PAGE for n in scans), plan
                    assert {n.get("Index Name") for n in scans} - {None} == {"pk_messaging_entries"}, plan
                else:
                    details = [r[-1] for r in await conn.execute(text(f"EXPLAIN QUERY PLAN {sql}"))]
                    # The primary key (eid, offset): SQLite names it as its automatic index.
                    pk = re.compile(
                        r"SEARCH messaging_entries USING "
                        r"(PRIMARY KEY|INDEX sqlite_autoindex_messaging_entries_1)"
                        r" \(eid=\? AND offset>\? AND offset<\?\)"
                    )
                    assert any(pk.fullmatch(d) for d in details), details
                    assert not any(d.startswith("SCAN") or "TEMP B-TREE" in d for d in details), details
    finally:
        await engine.dispose()


def _nodes(plan: dict[str, object]) -> list[dict[str, object]]:
    children = plan.get("Plans", [])
    assert isinstance(children, list)
    return [plan, *(n for child in children for n in _nodes(child))]


def test_plan_helper_walks_nested_plans() -> None:
    plan = json.loads('{"Node Type": "Limit", "Plans": [{"Node Type": "Index Scan"}]}')
    assert [n["Node Type"] for n in _nodes(plan)] == ["Limit", "Index Scan"]

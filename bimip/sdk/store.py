"""The device's durable local state (SQLite): the offset it has processed, and the outbox of
messages not yet acknowledged by the server. Every call runs in a worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bimip.common.v1 import common_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY CHECK (id = 1), processed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    client_id TEXT PRIMARY KEY,
    local_seq TEXT NOT NULL UNIQUE,
    message BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    client_id: str
    local_seq: str
    message: common_pb2.Message


class LocalStore:
    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, *args: object) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    async def processed(self) -> int:
        rows = await asyncio.to_thread(self._run, "SELECT processed FROM position WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    async def set_processed(self, offset: int) -> None:
        """Move the processed offset forward (never back)."""
        await asyncio.to_thread(
            self._run,
            "INSERT INTO position (id, processed) VALUES (1, ?) "
            "ON CONFLICT (id) DO UPDATE SET processed = max(processed, excluded.processed)",
            offset,
        )

    async def add(self, pending: Pending) -> None:
        await asyncio.to_thread(
            self._run,
            "INSERT OR IGNORE INTO outbox (client_id, local_seq, message) VALUES (?, ?, ?)",
            pending.client_id,
            pending.local_seq,
            pending.message.SerializeToString(),
        )

    async def remove(self, client_id: str) -> None:
        await asyncio.to_thread(self._run, "DELETE FROM outbox WHERE client_id = ?", client_id)

    async def outbox(self) -> list[Pending]:
        rows = await asyncio.to_thread(
            self._run, "SELECT client_id, local_seq, message FROM outbox ORDER BY local_seq"
        )
        return [Pending(str(c), str(s), common_pb2.Message.FromString(bytes(m))) for c, s, m in rows]

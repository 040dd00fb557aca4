"""The device's durable local state (SQLite), every call run in a worker thread:

- `position`: the offset up to which the application has processed the log;
- `outbox`: messages not yet acknowledged by the server, in the order they were written;
- `log`: the device's copy of its log — every entry handed to the application, and the messages
  this device sent, at their offsets. Conversation history is read from it, and range checksums
  for a resume from a snapshot (SPEC S4) are computed over it (own entries excluded, as the
  server's are).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterable, Sequence
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
CREATE TABLE IF NOT EXISTS log (
    "offset" INTEGER PRIMARY KEY,
    own INTEGER NOT NULL,
    peer TEXT NOT NULL,
    entry BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS log_by_peer ON log (peer, "offset");
"""


@dataclass(frozen=True)
class Pending:
    client_id: str
    local_seq: str
    message: common_pb2.Message


def _row(entry: common_pb2.Entry, own: bool) -> tuple[int, int, str, bytes]:
    return entry.offset, int(own), entry.peer_eid, entry.SerializeToString(deterministic=True)


def _entries(rows: Iterable[Sequence[Any]]) -> list[common_pb2.Entry]:
    return [common_pb2.Entry.FromString(bytes(row[0])) for row in rows]


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

    def _transaction(self, steps: list[tuple[str, Sequence[Any] | list[Sequence[Any]]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for sql, args in steps:
                    if isinstance(args, list):  # many rows
                        if args:
                            self._db.executemany(sql, args)
                    else:
                        self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    async def processed(self) -> int:
        rows = await asyncio.to_thread(self._run, "SELECT processed FROM position WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    async def set_processed(self, offset: int, entries: Sequence[common_pb2.Entry] = ()) -> None:
        """Keep `entries` in the log copy and move the processed offset forward (never back), in
        one transaction."""
        await asyncio.to_thread(
            self._transaction,
            [
                (
                    'INSERT OR REPLACE INTO log ("offset", own, peer, entry) VALUES (?, ?, ?, ?)',
                    [_row(e, False) for e in entries],
                ),
                (
                    "INSERT INTO position (id, processed) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET processed = max(processed, excluded.processed)",
                    (offset,),
                ),
            ],
        )

    async def reset(self, version: int) -> None:
        """The device now stands at `version`: the position moves there (back, too) and the log
        copy forgets what lies beyond it."""
        await asyncio.to_thread(
            self._transaction,
            [
                ('DELETE FROM log WHERE "offset" > ?', (version,)),
                (
                    "INSERT INTO position (id, processed) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET processed = excluded.processed",
                    (version,),
                ),
            ],
        )

    async def add(self, pending: Pending) -> None:
        await asyncio.to_thread(
            self._run,
            "INSERT OR IGNORE INTO outbox (client_id, local_seq, message) VALUES (?, ?, ?)",
            pending.client_id,
            pending.local_seq,
            pending.message.SerializeToString(),
        )

    async def sent(self, client_id: str, entry: common_pb2.Entry | None) -> None:
        """The server took (or refused, `entry` None) the outbox message `client_id`: it leaves the
        outbox and, taken, enters the log copy as this device's own entry."""
        steps: list[tuple[str, Sequence[Any] | list[Sequence[Any]]]] = [
            ("DELETE FROM outbox WHERE client_id = ?", (client_id,))
        ]
        if entry is not None:
            steps.append(
                (
                    'INSERT OR REPLACE INTO log ("offset", own, peer, entry) VALUES (?, ?, ?, ?)',
                    _row(entry, True),
                )
            )
        await asyncio.to_thread(self._transaction, steps)

    async def outbox(self) -> list[Pending]:
        rows = await asyncio.to_thread(
            self._run, "SELECT client_id, local_seq, message FROM outbox ORDER BY local_seq"
        )
        return [Pending(str(c), str(s), common_pb2.Message.FromString(bytes(m))) for c, s, m in rows]

    async def history(self, peer: str, limit: int) -> list[common_pb2.Entry]:
        """The last `limit` entries of the conversation with `peer`, oldest first."""
        rows = await asyncio.to_thread(
            self._run,
            'SELECT entry FROM (SELECT "offset", entry FROM log WHERE peer = ? '
            'ORDER BY "offset" DESC LIMIT ?) ORDER BY "offset"',
            peer,
            limit,
        )
        return _entries(rows)

    async def serialized(self, upto: int) -> list[tuple[int, bytes]]:
        """(offset, stored bytes) of the entries the server also sees for this device (own
        entries excluded), up to `upto`, for range checksums."""
        rows = await asyncio.to_thread(
            self._run,
            'SELECT "offset", entry FROM log WHERE own = 0 AND "offset" <= ? ORDER BY "offset"',
            upto,
        )
        return [(int(offset), bytes(body)) for offset, body in rows]

    async def replace_range(self, first: int, last: int, entries: Sequence[common_pb2.Entry]) -> None:
        """The server's copy of offsets first..last replaces the local one (own entries stay)."""
        await asyncio.to_thread(
            self._transaction,
            [
                ('DELETE FROM log WHERE own = 0 AND "offset" BETWEEN ? AND ?', (first, last)),
                (
                    'INSERT OR REPLACE INTO log ("offset", own, peer, entry) VALUES (?, ?, ?, ?)',
                    [_row(e, False) for e in entries],
                ),
            ],
        )

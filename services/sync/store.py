"""The sync service's tables (prefix `sync_`); changes to them need a migration."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, LargeBinary, PrimaryKeyConstraint, String, Table
from sqlmodel import SQLModel

from bimip.core.storage import UtcDateTime

_EID = String(256)

snapshots = Table(
    "sync_snapshots",
    SQLModel.metadata,
    # A user's snapshot at a version (S3): its summary checksum and the fold state it was built from,
    # from which later snapshots continue (a checkpoint).
    Column("snapshot_id", String(32), nullable=False),
    Column("eid", _EID, nullable=False),
    Column("version", BigInteger(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("checksum", LargeBinary(), nullable=False),
    Column("state", LargeBinary(), nullable=False),
    PrimaryKeyConstraint("snapshot_id", name="pk_sync_snapshots"),
    Index("ux_sync_snapshots_eid_version", "eid", "version", unique=True),
)

device_snapshots = Table(
    "sync_device_snapshots",
    SQLModel.metadata,
    # The last snapshot each device received (S6).
    Column("eid", _EID, nullable=False),
    Column("device_id", String(256), nullable=False),
    Column("snapshot_id", String(32), nullable=False),
    Column("version", BigInteger(), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("eid", "device_id", name="pk_sync_device_snapshots"),
)

ranges = Table(
    "sync_ranges",
    SQLModel.metadata,
    # The SHA-256 of each full range of a device's view of the log (S4): entries never change once
    # written, so a full range's digest never does, and a snapshot or resume hashes only what is new.
    Column("eid", _EID, nullable=False),
    Column("device_id", String(256), nullable=False),
    Column("range_index", BigInteger(), nullable=False),
    Column("sha256", LargeBinary(), nullable=False),
    PrimaryKeyConstraint("eid", "device_id", "range_index", name="pk_sync_ranges"),
)

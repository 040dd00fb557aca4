"""The messaging service's tables (prefix `messaging_`); changes to them need a migration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    false,
    text,
)
from sqlmodel import Field, SQLModel

from bimip.core.storage import UtcDateTime

EID_MAX_LENGTH = 256
DEVICE_ID_MAX_LENGTH = 256


class Device(SQLModel, table=True):
    """A device of a user: where its cursor stands and when it was first and last seen (M10, X3)."""

    __tablename__ = "messaging_devices"
    __table_args__ = (
        PrimaryKeyConstraint("eid", "device_id", name="pk_messaging_devices"),
        # Active devices of a user: WHERE eid = ? AND last_seen_at >= now - retention.
        Index("ix_messaging_devices_eid_last_seen_at", "eid", "last_seen_at"),
    )

    eid: str = Field(sa_column=Column("eid", String(EID_MAX_LENGTH), nullable=False))
    device_id: str = Field(sa_column=Column("device_id", String(DEVICE_ID_MAX_LENGTH), nullable=False))
    cursor: int = Field(
        default=0, sa_column=Column("cursor", BigInteger(), nullable=False, server_default=text("0"))
    )
    first_seen_at: datetime = Field(sa_column=Column("first_seen_at", UtcDateTime(), nullable=False))
    last_seen_at: datetime = Field(sa_column=Column("last_seen_at", UtcDateTime(), nullable=False))


devices: Table = Device.__table__  # type: ignore[attr-defined]

# The other tables are plain SQLAlchemy Core: the service reads and writes them in bulk statements.
_metadata = SQLModel.metadata
_EID = String(EID_MAX_LENGTH)
_DEVICE = String(DEVICE_ID_MAX_LENGTH)
_SIGNAL = String(26)  # a ULID
_TRACE = String(256)  # a W3C traceparent

# What an entry's body is (the oneof of bimip.common.v1.Entry).
KIND_MESSAGE = 1
KIND_RECEIPT = 2
KIND_COMMAND = 3

logs = Table(
    "messaging_logs",
    _metadata,
    # One row per user: the last offset given out. Taking offsets upserts this row, which
    # serialises writers of one log (M2); rows are always taken in eid order.
    Column("eid", _EID, nullable=False),
    Column("head", BigInteger(), nullable=False),
    Column("first_offset", BigInteger(), nullable=False, server_default=text("1")),
    PrimaryKeyConstraint("eid", name="pk_messaging_logs"),
)

entries = Table(
    "messaging_entries",
    _metadata,
    # The logs themselves: (eid, offset) is gap-free per eid (M2, M4).
    Column("eid", _EID, nullable=False),
    Column("offset", BigInteger(), nullable=False),
    Column("kind", SmallInteger(), nullable=False),
    Column("peer_eid", _EID, nullable=False),
    Column("author_eid", _EID, nullable=False),
    Column("author_device", _DEVICE, nullable=False),
    # Set when the entry is for one device of the log's owner only (M4).
    Column("target_device", _DEVICE, nullable=True),
    Column("signal_id", _SIGNAL, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("trace_context", _TRACE, nullable=True),
    # The serialized bimip.common.v1.Entry, offset included.
    Column("body", LargeBinary(), nullable=False),
    PrimaryKeyConstraint("eid", "offset", name="pk_messaging_entries"),
    # One conversation of a log (RESUME replays, M11).
    Index("ix_messaging_entries_eid_peer_eid_offset", "eid", "peer_eid", "offset"),
)

sends = Table(
    "messaging_sends",
    _metadata,
    # Idempotency keys (M3): what a (sender, client id) was, for the dedupe window.
    Column("sender_eid", _EID, nullable=False),
    Column("client_id", String(1024), nullable=False),
    Column("signal_id", _SIGNAL, nullable=False),
    Column("offset", BigInteger(), nullable=False),
    Column("server_time", UtcDateTime(), nullable=False),
    Column("content_hash", LargeBinary(), nullable=False),
    PrimaryKeyConstraint("sender_eid", "client_id", name="pk_messaging_sends"),
    Index("ix_messaging_sends_server_time", "server_time"),
)

messages = Table(
    "messaging_messages",
    _metadata,
    # One row per message: who, where, and its aggregate status (M8) and edit state (M9).
    Column("signal_id", _SIGNAL, nullable=False),
    Column("client_id", String(1024), nullable=False),
    Column("sender_eid", _EID, nullable=False),
    Column("sender_device", _DEVICE, nullable=False),
    Column("recipient_eid", _EID, nullable=False),
    Column("recipient_device", _DEVICE, nullable=True),
    Column("sender_offset", BigInteger(), nullable=False),
    Column("recipient_offset", BigInteger(), nullable=False),
    Column("status", SmallInteger(), nullable=False),
    Column("sent_at", UtcDateTime(), nullable=False),
    Column("delivered_at", UtcDateTime(), nullable=True),
    Column("read_at", UtcDateTime(), nullable=True),
    Column("played_at", UtcDateTime(), nullable=True),
    Column("deleted", Boolean(), nullable=False, server_default=false()),
    # The winning edit's hybrid logical clock and device (last writer wins, M9).
    Column("edit_wall_ms", BigInteger(), nullable=True),
    Column("edit_counter", BigInteger(), nullable=True),
    Column("edit_device", _DEVICE, nullable=True),
    Column("trace_context", _TRACE, nullable=True),
    PrimaryKeyConstraint("signal_id", name="pk_messaging_messages"),
    # "Everything from this peer up to offset N" (M8 marks).
    Index("ix_messaging_messages_recipient", "recipient_eid", "sender_eid", "recipient_offset"),
)

statuses = Table(
    "messaging_statuses",
    _metadata,
    # Per recipient device progress on a message (M8).
    Column("signal_id", _SIGNAL, nullable=False),
    Column("eid", _EID, nullable=False),
    Column("device_id", _DEVICE, nullable=False),
    Column("status", SmallInteger(), nullable=False),
    Column("delivered_at", UtcDateTime(), nullable=True),
    Column("read_at", UtcDateTime(), nullable=True),
    Column("played_at", UtcDateTime(), nullable=True),
    PrimaryKeyConstraint("signal_id", "eid", "device_id", name="pk_messaging_statuses"),
)

blocks = Table(
    "messaging_blocks",
    _metadata,
    # Blocks reported by awareness (A6): messages are refused in both directions.
    Column("blocker_eid", _EID, nullable=False),
    Column("blocked_eid", _EID, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("blocker_eid", "blocked_eid", name="pk_messaging_blocks"),
)

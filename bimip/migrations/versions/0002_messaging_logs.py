"""messaging: logs, entries, idempotency keys, messages, per-device statuses and blocks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EID = sa.String(length=256)
DEVICE = sa.String(length=256)
SIGNAL = sa.String(length=26)
TRACE = sa.String(length=256)
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "messaging_logs",
        sa.Column("eid", EID, nullable=False),
        sa.Column("head", sa.BigInteger(), nullable=False),
        sa.Column("first_offset", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.PrimaryKeyConstraint("eid", name="pk_messaging_logs"),
    )
    op.create_table(
        "messaging_entries",
        sa.Column("eid", EID, nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("peer_eid", EID, nullable=False),
        sa.Column("author_eid", EID, nullable=False),
        sa.Column("author_device", DEVICE, nullable=False),
        sa.Column("target_device", DEVICE, nullable=True),
        sa.Column("signal_id", SIGNAL, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("trace_context", TRACE, nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("eid", "offset", name="pk_messaging_entries"),
    )
    op.create_index(
        "ix_messaging_entries_eid_peer_eid_offset", "messaging_entries", ["eid", "peer_eid", "offset"]
    )
    op.create_table(
        "messaging_sends",
        sa.Column("sender_eid", EID, nullable=False),
        sa.Column("client_id", sa.String(length=1024), nullable=False),
        sa.Column("signal_id", SIGNAL, nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("server_time", TIME, nullable=False),
        sa.Column("content_hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sender_eid", "client_id", name="pk_messaging_sends"),
    )
    op.create_index("ix_messaging_sends_server_time", "messaging_sends", ["server_time"])
    op.create_table(
        "messaging_messages",
        sa.Column("signal_id", SIGNAL, nullable=False),
        sa.Column("client_id", sa.String(length=1024), nullable=False),
        sa.Column("sender_eid", EID, nullable=False),
        sa.Column("sender_device", DEVICE, nullable=False),
        sa.Column("recipient_eid", EID, nullable=False),
        sa.Column("recipient_device", DEVICE, nullable=True),
        sa.Column("sender_offset", sa.BigInteger(), nullable=False),
        sa.Column("recipient_offset", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("sent_at", TIME, nullable=False),
        sa.Column("delivered_at", TIME, nullable=True),
        sa.Column("read_at", TIME, nullable=True),
        sa.Column("played_at", TIME, nullable=True),
        sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("edit_wall_ms", sa.BigInteger(), nullable=True),
        sa.Column("edit_counter", sa.BigInteger(), nullable=True),
        sa.Column("edit_device", DEVICE, nullable=True),
        sa.Column("trace_context", TRACE, nullable=True),
        sa.PrimaryKeyConstraint("signal_id", name="pk_messaging_messages"),
    )
    op.create_index(
        "ix_messaging_messages_recipient",
        "messaging_messages",
        ["recipient_eid", "sender_eid", "recipient_offset"],
    )
    op.create_table(
        "messaging_statuses",
        sa.Column("signal_id", SIGNAL, nullable=False),
        sa.Column("eid", EID, nullable=False),
        sa.Column("device_id", DEVICE, nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("delivered_at", TIME, nullable=True),
        sa.Column("read_at", TIME, nullable=True),
        sa.Column("played_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("signal_id", "eid", "device_id", name="pk_messaging_statuses"),
    )
    op.create_table(
        "messaging_blocks",
        sa.Column("blocker_eid", EID, nullable=False),
        sa.Column("blocked_eid", EID, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("blocker_eid", "blocked_eid", name="pk_messaging_blocks"),
    )


def downgrade() -> None:
    op.drop_table("messaging_blocks")
    op.drop_table("messaging_statuses")
    op.drop_index("ix_messaging_messages_recipient", table_name="messaging_messages")
    op.drop_table("messaging_messages")
    op.drop_index("ix_messaging_sends_server_time", table_name="messaging_sends")
    op.drop_table("messaging_sends")
    op.drop_index("ix_messaging_entries_eid_peer_eid_offset", table_name="messaging_entries")
    op.drop_table("messaging_entries")
    op.drop_table("messaging_logs")

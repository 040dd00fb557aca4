"""messaging: the devices table (cursor and last-seen time per device).

Revision ID: 0001
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "messaging_devices",
        sa.Column("eid", sa.String(length=256), nullable=False),
        sa.Column("device_id", sa.String(length=256), nullable=False),
        sa.Column("cursor", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("eid", "device_id", name="pk_messaging_devices"),
    )
    op.create_index("ix_messaging_devices_eid_last_seen_at", "messaging_devices", ["eid", "last_seen_at"])


def downgrade() -> None:
    op.drop_index("ix_messaging_devices_eid_last_seen_at", table_name="messaging_devices")
    op.drop_table("messaging_devices")

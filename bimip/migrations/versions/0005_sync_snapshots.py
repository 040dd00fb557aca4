"""sync: snapshots (checkpoints) and each device's last snapshot.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sync_snapshots",
        sa.Column("snapshot_id", sa.String(length=32), nullable=False),
        sa.Column("eid", sa.String(length=256), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checksum", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("snapshot_id", name="pk_sync_snapshots"),
    )
    op.create_index("ux_sync_snapshots_eid_version", "sync_snapshots", ["eid", "version"], unique=True)
    op.create_table(
        "sync_device_snapshots",
        sa.Column("eid", sa.String(length=256), nullable=False),
        sa.Column("device_id", sa.String(length=256), nullable=False),
        sa.Column("snapshot_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("eid", "device_id", name="pk_sync_device_snapshots"),
    )


def downgrade() -> None:
    op.drop_table("sync_device_snapshots")
    op.drop_index("ux_sync_snapshots_eid_version", table_name="sync_snapshots")
    op.drop_table("sync_snapshots")

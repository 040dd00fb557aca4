"""sync: the digests of full ranges per device.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sync_ranges",
        sa.Column("eid", sa.String(length=256), nullable=False),
        sa.Column("device_id", sa.String(length=256), nullable=False),
        sa.Column("range_index", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("eid", "device_id", "range_index", name="pk_sync_ranges"),
    )


def downgrade() -> None:
    op.drop_table("sync_ranges")

"""awareness: subscriptions and blocks.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EID = sa.String(length=256)
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "awareness_subscriptions",
        sa.Column("subscriber_eid", EID, nullable=False),
        sa.Column("target_eid", EID, nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("subscriber_eid", "target_eid", name="pk_awareness_subscriptions"),
    )
    op.create_index(
        "ix_awareness_subscriptions_target_eid", "awareness_subscriptions", ["target_eid", "subscriber_eid"]
    )
    op.create_table(
        "awareness_blocks",
        sa.Column("blocker_eid", EID, nullable=False),
        sa.Column("blocked_eid", EID, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("blocker_eid", "blocked_eid", name="pk_awareness_blocks"),
    )


def downgrade() -> None:
    op.drop_table("awareness_blocks")
    op.drop_index("ix_awareness_subscriptions_target_eid", table_name="awareness_subscriptions")
    op.drop_table("awareness_subscriptions")

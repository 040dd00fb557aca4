"""The awareness service's tables (prefix `awareness_`); changes to them need a migration."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Index, PrimaryKeyConstraint, SmallInteger, String, Table, false, text
from sqlmodel import SQLModel

from bimip.core.storage import UtcDateTime

_EID = String(256)

subscriptions = Table(
    "awareness_subscriptions",
    SQLModel.metadata,
    # One way (A6): subscriber_eid sees target_eid's presence once the state is APPROVED.
    Column("subscriber_eid", _EID, nullable=False),
    Column("target_eid", _EID, nullable=False),
    Column("state", SmallInteger(), nullable=False),  # bimip.awareness.v1.SubscriptionState
    Column("updated_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("subscriber_eid", "target_eid", name="pk_awareness_subscriptions"),
    # A user's subscribers (who sees my presence).
    Index("ix_awareness_subscriptions_target_eid", "target_eid", "subscriber_eid"),
)

blocks = Table(
    "awareness_blocks",
    SQLModel.metadata,
    # A block works both ways (A6); messaging keeps its own copy, told over PresenceLink.
    Column("blocker_eid", _EID, nullable=False),
    Column("blocked_eid", _EID, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("blocker_eid", "blocked_eid", name="pk_awareness_blocks"),
)

users = Table(
    "awareness_users",
    SQLModel.metadata,
    # Per user: the intent (A1; 0 = none), whether presence is hidden (A7), and when the last device
    # went offline (the last-seen time).
    Column("eid", _EID, nullable=False),
    Column("intent", SmallInteger(), nullable=False, server_default=text("0")),
    Column("hidden", Boolean(), nullable=False, server_default=false()),
    Column("last_seen_at", UtcDateTime(), nullable=True),
    PrimaryKeyConstraint("eid", name="pk_awareness_users"),
)

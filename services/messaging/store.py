"""The messaging service's tables (prefix `messaging_`); changes to them need a migration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, PrimaryKeyConstraint, String, text
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

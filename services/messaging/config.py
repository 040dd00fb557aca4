"""Settings of the messaging service: the shared ones, plus the limits and timers of SPEC §1 and X3."""

from __future__ import annotations

from pydantic import Field

from bimip.core.config import CoreSettings


class MessagingSettings(CoreSettings):
    """Environment variables BIMIP_*; see `bimip settings`."""

    window: int = Field(256, ge=1, le=10_000, description="Unacknowledged entries in flight per device (M6)")
    grace_period_s: float = Field(
        30.0, gt=0, le=3600, description="Unacknowledged entries are sent again after this (M6)"
    )
    dedupe_window_s: float = Field(
        86_400.0, gt=0, le=30 * 86_400, description="How long a (sender, client id) stays idempotent (M3)"
    )
    max_payload_bytes: int = Field(
        65_536, ge=1, le=1_048_576, description="Limit on payload + encrypted + signature of a message (M1)"
    )
    max_client_id_bytes: int = Field(128, ge=1, le=1024, description="Longest client id (X3)")
    device_retention_days: float = Field(
        30.0, gt=0, le=3650, description="A device unseen this long stops holding the commit offset (M10)"
    )
    max_devices: int = Field(20, ge=1, le=1000, description="Devices per user seen within retention (X3)")
    send_rate: float = Field(100.0, gt=0, description="Sends per second per device, sustained (X3)")
    send_burst: int = Field(200, ge=1, description="Sends per device allowed in a burst (X3)")
    batch_max: int = Field(512, ge=1, le=10_000, description="Most writes committed in one transaction")

"""Settings of the awareness service: the shared ones, plus the timers of SPEC §2."""

from __future__ import annotations

from pydantic import Field, model_validator

from bimip.core.config import CoreSettings


class AwarenessSettings(CoreSettings):
    """Environment variables BIMIP_*; see `bimip settings`."""

    typing_ttl_s: float = Field(6.0, gt=0, le=300, description="TYPING expires unless refreshed (A3)")
    recording_ttl_s: float = Field(12.0, gt=0, le=600, description="RECORDING expires unless refreshed (A3)")
    presence_ttl_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A device with no heartbeat for this long, or whose server died, goes OFFLINE (A5)",
    )

    @model_validator(mode="after")
    def _ttl_after_heartbeat(self) -> AwarenessSettings:
        # A5: never OFFLINE before one heartbeat interval has passed.
        if self.presence_ttl_s < self.heartbeat_interval_s:
            raise ValueError("BIMIP_PRESENCE_TTL_S must be at least BIMIP_HEARTBEAT_INTERVAL_S")
        return self

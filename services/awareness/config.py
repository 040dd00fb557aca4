"""Settings of the awareness service: the shared ones, plus the timers of SPEC §2."""

from __future__ import annotations

from pydantic import Field

from bimip.core.config import CoreSettings


class AwarenessSettings(CoreSettings):
    """Environment variables BIMIP_*; see `bimip settings`."""

    typing_ttl_s: float = Field(6.0, gt=0, le=300, description="TYPING expires unless refreshed (A3)")
    recording_ttl_s: float = Field(12.0, gt=0, le=600, description="RECORDING expires unless refreshed (A3)")

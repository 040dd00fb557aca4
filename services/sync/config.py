"""Settings of the sync service: the shared ones, plus page sizes, checkpoints and hello limits."""

from __future__ import annotations

from pydantic import Field

from bimip.core.config import CoreSettings


class SyncSettings(CoreSettings):
    """Environment variables BIMIP_*; see `bimip settings`."""

    delta_page_size: int = Field(
        500, ge=1, le=1000, description="Entries per delta page when the client asks for 0 (S2)"
    )
    checkpoint_every_entries: int = Field(
        1000,
        ge=1,
        le=10_000_000,
        description="A user's snapshot is checkpointed once the head is this far past the last (S3)",
    )
    checkpoint_every_s: float = Field(
        3600.0,
        gt=0,
        le=30 * 86_400,
        description="…or once the last checkpoint is this old and the head moved (S3)",
    )
    hello_max_messages: int = Field(
        1000, ge=1, le=10_000, description="Offline messages one hello may upload (S5)"
    )

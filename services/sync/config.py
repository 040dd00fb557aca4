"""Settings of the sync service: the shared ones, plus its own as its rules are built."""

from __future__ import annotations

from bimip.core.config import CoreSettings


class SyncSettings(CoreSettings):
    """Environment variables BIMIP_*; see `bimip settings`."""

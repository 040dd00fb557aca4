"""Settings of the messaging service: the shared ones, plus its own as its rules are built."""

from __future__ import annotations

from bimip.core.config import CoreSettings


class MessagingSettings(CoreSettings):
    """Environment variables BIMIP_*; see `bimip settings`."""

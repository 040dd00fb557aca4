"""BIMIP's Python client SDK (asyncio): `Client`, its events and its one exception."""

from bimip.sdk.client import Client, SendResult, token_identity
from bimip.sdk.errors import BimipClientError
from bimip.sdk.events import (
    ConnectionChanged,
    EntryEvent,
    Event,
    MessageDeleted,
    MessageEdited,
    MessageMirrored,
    MessageReceived,
    ReceiptUpdated,
)

__all__ = [
    "BimipClientError",
    "Client",
    "ConnectionChanged",
    "EntryEvent",
    "Event",
    "MessageDeleted",
    "MessageEdited",
    "MessageMirrored",
    "MessageReceived",
    "ReceiptUpdated",
    "SendResult",
    "token_identity",
]

"""BIMIP's Python client SDK (asyncio): `Client`, its events and its one exception.

Status values are re-exported for convenience: presence and activity (`ONLINE`, `AWAY`, `BUSY`,
`DND`, `OFFLINE`, `TYPING`, `RECORDING`, `PAUSED`) and delivery (`SENT`, `DELIVERED`, `READ`,
`PLAYED`).
"""

from bimip.awareness.v1.awareness_pb2 import (
    STATUS_AWAY as AWAY,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_BUSY as BUSY,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_DND as DND,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_OFFLINE as OFFLINE,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_ONLINE as ONLINE,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_PAUSED as PAUSED,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_RECORDING as RECORDING,
)
from bimip.awareness.v1.awareness_pb2 import (
    STATUS_TYPING as TYPING,
)
from bimip.common.v1.common_pb2 import (
    DELIVERY_STATUS_DELIVERED as DELIVERED,
)
from bimip.common.v1.common_pb2 import (
    DELIVERY_STATUS_PLAYED as PLAYED,
)
from bimip.common.v1.common_pb2 import (
    DELIVERY_STATUS_READ as READ,
)
from bimip.common.v1.common_pb2 import (
    DELIVERY_STATUS_SENT as SENT,
)
from bimip.sdk.client import Client, SendResult, Stats, SyncResult, token_identity
from bimip.sdk.errors import BimipClientError
from bimip.sdk.events import (
    ActivityChanged,
    AwarenessEvent,
    ConnectionChanged,
    EntryEvent,
    Event,
    IntentChanged,
    MessageDeleted,
    MessageEdited,
    MessageMirrored,
    MessageReceived,
    PresenceChanged,
    ReceiptUpdated,
    SnapshotLoaded,
    SubscriptionChanged,
    VisibilityChanged,
)

__all__ = [
    "AWAY",
    "BUSY",
    "DELIVERED",
    "DND",
    "OFFLINE",
    "ONLINE",
    "PAUSED",
    "PLAYED",
    "READ",
    "RECORDING",
    "SENT",
    "TYPING",
    "ActivityChanged",
    "AwarenessEvent",
    "BimipClientError",
    "Client",
    "ConnectionChanged",
    "EntryEvent",
    "Event",
    "IntentChanged",
    "MessageDeleted",
    "MessageEdited",
    "MessageMirrored",
    "MessageReceived",
    "PresenceChanged",
    "ReceiptUpdated",
    "SendResult",
    "SnapshotLoaded",
    "Stats",
    "SubscriptionChanged",
    "SyncResult",
    "VisibilityChanged",
    "token_identity",
]

"""Identifiers: user eids, device ids, client ids and server signal ids (ULIDs)."""

from __future__ import annotations

import os
import re
import threading
import time

MAX_EID_BYTES = 256
MAX_DEVICE_ID_BYTES = 256

# local@domain, like a JID's bare form: no whitespace, control characters, '/' or a second '@'.
_EID = re.compile(r"^[^\s@/\x00-\x1f\x7f]+@[^\s@/\x00-\x1f\x7f]+$")
_DEVICE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


def eid_problem(eid: str, limit: int = MAX_EID_BYTES) -> str | None:
    """Why `eid` is not a valid user id, or None if it is."""
    if not eid:
        return "is empty"
    if len(eid.encode()) > limit:
        return f"is longer than {limit} bytes"
    if not _EID.match(eid):
        return "is not of the form local@domain"
    return None


def device_id_problem(device_id: str, limit: int = MAX_DEVICE_ID_BYTES) -> str | None:
    """Why `device_id` is not a valid device id, or None if it is."""
    if not device_id:
        return "is empty"
    if len(device_id.encode()) > limit:
        return f"is longer than {limit} bytes"
    if not _DEVICE.match(device_id):
        return "contains whitespace or control characters"
    return None


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class UlidGenerator:
    """ULIDs (48-bit millisecond time + 80 random bits, Crockford base32), monotonic in-process.

    Within one millisecond the random part is incremented, so ids from one replica sort in issue
    order; across replicas they sort by server time, roughly (SPEC: signal_id).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new(self, now_ms: int | None = None) -> str:
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            if ms <= self._last_ms:
                ms = self._last_ms
                rand = self._last_rand + 1
            else:
                rand = int.from_bytes(os.urandom(10), "big") >> 1  # leave room to increment
            self._last_ms, self._last_rand = ms, rand
        value = (ms << 80) | rand
        return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))

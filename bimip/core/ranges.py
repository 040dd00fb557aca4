"""Range checksums over a log (SPEC S4), computed the same way by the sync service and clients.

Range k covers offsets [k·1024 + 1, (k+1)·1024]. Its checksum is the SHA-256 of the concatenation, in
offset order, of every entry of the range that the device sees, each as its 8-byte big-endian
offset, then the 4-byte big-endian length and the bytes of the Entry's deterministic protobuf
serialization. An empty range's checksum is the SHA-256 of nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from bimip.common.v1 import common_pb2

RANGE_SIZE = 1024
EMPTY = hashlib.sha256().digest()


def range_of(offset: int) -> int:
    """The index of the range holding `offset` (offsets start at 1)."""
    return (offset - 1) // RANGE_SIZE


def ranges_upto(version: int) -> int:
    """How many ranges cover offsets 1..version."""
    return (version + RANGE_SIZE - 1) // RANGE_SIZE


class RangeHasher:
    """Feed entries in offset order; `digests()` returns range index -> SHA-256 for every range up
    to the version given (empty ranges included)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self._hashes: dict[int, hashlib._Hash] = {}

    def add(self, entry: common_pb2.Entry) -> None:
        self.add_serialized(entry.offset, entry.SerializeToString(deterministic=True))

    def add_serialized(self, offset: int, body: bytes) -> None:
        """Add an entry given as its deterministic serialization (a client's stored copy)."""
        if not 0 < offset <= self.version:
            return
        h = self._hashes.get(k := range_of(offset))
        if h is None:
            h = self._hashes[k] = hashlib.sha256()
        h.update(offset.to_bytes(8, "big") + len(body).to_bytes(4, "big") + body)

    def add_all(self, entries: Iterable[common_pb2.Entry]) -> RangeHasher:
        for entry in entries:
            self.add(entry)
        return self

    def digests(self) -> dict[int, bytes]:
        return {
            k: (self._hashes[k].digest() if k in self._hashes else EMPTY)
            for k in range(ranges_upto(self.version))
        }

"""What the test clients of every bidirectional stream share: a reader that records each frame."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc


class RecordedCall:
    """An open stream call whose server frames are all kept, in order, by a reader task."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.frames: list[Any] = []
        self.ended: grpc.aio.AioRpcError | None = None  # the status it ended with, if an error
        self.finished = False
        self._seq = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    def of(self, kind: str) -> list[Any]:
        """The frames whose `frame` oneof is `kind`, as that body."""
        return [getattr(f, kind) for f in self.frames if f.WhichOneof("frame") == kind]

    async def stop_reading(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            while (frame := await self.call.read()) is not grpc.aio.EOF:
                self.frames.append(frame)
        except grpc.aio.AioRpcError as err:
            self.ended = err
        except asyncio.CancelledError:
            pass
        self.finished = True

"""A small test client of the sync service: unary calls with a device's token, and the hello stream."""

from __future__ import annotations

from typing import Any

import grpc

from bimip.common.v1 import common_pb2
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc
from tests.helpers import eventually
from tests.streams import RecordedCall


class SyncDevice:
    """One device's view of the sync service."""

    def __init__(self, suite: Any, channel: grpc.aio.Channel, eid: str, device_id: str) -> None:
        self.eid, self.device_id = eid, device_id
        self.stub = sync_pb2_grpc.SyncServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {suite.token(eid, device_id)}"),)

    async def delta(self, since: int, page_size: int = 0) -> sync_pb2.GetDeltaResponse:
        request = sync_pb2.GetDeltaRequest(since_version=since, page_size=page_size)
        return await self.stub.GetDelta(request, metadata=self.metadata, timeout=30)

    async def stream_delta(self, since: int, page_size: int = 0) -> list[sync_pb2.GetDeltaResponse]:
        request = sync_pb2.StreamDeltaRequest(since_version=since, page_size=page_size)
        return [r.page async for r in self.stub.StreamDelta(request, metadata=self.metadata, timeout=60)]

    async def everything(self, since: int = 0) -> list[common_pb2.Entry]:
        """Every entry after `since`, page by page through GetDelta."""
        entries: list[common_pb2.Entry] = []
        while True:
            page = await self.delta(since)
            entries.extend(page.entries)
            since = page.next_version
            if not page.more:
                return entries

    async def snapshot(self, version: int = 0) -> sync_pb2.Snapshot:
        request = sync_pb2.GetSnapshotRequest(version=version)
        return (await self.stub.GetSnapshot(request, metadata=self.metadata, timeout=60)).snapshot

    async def resume(self, **request: Any) -> sync_pb2.ResumeSnapshotResponse:
        request.setdefault("algorithm", sync_pb2.CHECKSUM_ALGORITHM_SHA256_RANGE_1024)
        message = sync_pb2.ResumeSnapshotRequest(**request)
        return await self.stub.ResumeSnapshot(message, metadata=self.metadata, timeout=60)

    async def devices(self) -> sync_pb2.ListDevicesResponse:
        return await self.stub.ListDevices(sync_pb2.ListDevicesRequest(), metadata=self.metadata, timeout=30)

    async def hello(self) -> Hello:
        return Hello(self.stub.Hello(metadata=self.metadata, timeout=120))


class Hello(RecordedCall):
    """An open hello exchange."""

    async def open(self, last_version: int, *uploads: sync_pb2.OfflineMessage, more: bool = False) -> None:
        opening = sync_pb2.HelloOpen(last_version=last_version, messages=uploads, more=more)
        await self.call.write(sync_pb2.HelloRequest(seq=1, open=opening))

    async def write(self, **frame: Any) -> int:
        seq = next(self._seq) + 1
        await self.call.write(sync_pb2.HelloRequest(seq=seq, **frame))
        return seq

    async def until_end(self, timeout: float = 30) -> sync_pb2.HelloEnd:
        (end,) = await eventually(lambda: self.of("end") or self.ended, timeout=timeout)
        assert not isinstance(end, grpc.aio.AioRpcError), end
        return end

    async def reply(self, seq: int, timeout: float = 15) -> sync_pb2.HelloResponse:
        return await eventually(lambda: next((f for f in self.frames if f.seq == seq), None), timeout=timeout)

    async def ended_with(self, timeout: float = 15) -> grpc.aio.AioRpcError:
        """The error status the server ended the exchange with."""
        return await eventually(lambda: self.ended, timeout=timeout)  # type: ignore[no-any-return]

    def entries(self) -> list[common_pb2.Entry]:
        return [entry for page in self.of("page") for entry in page.entries]

    async def close(self) -> None:
        await self.call.done_writing()
        await eventually(lambda: self.finished, timeout=15)


def offline(to: str, client_id: str, local_seq: str, payload: bytes = b"offline") -> sync_pb2.OfflineMessage:
    message = common_pb2.Message(
        client_id=client_id,
        recipient=common_pb2.Identity(eid=to),
        type=common_pb2.MESSAGE_TYPE_CHAT,
        payload=payload,
    )
    return sync_pb2.OfflineMessage(message=message, local_seq=local_seq)

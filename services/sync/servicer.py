"""gRPC face of the sync service (SPEC §3). Who syncs is the caller the token names: no request
field can name another user or device."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from bimip.common.v1 import common_pb2
from bimip.core.auth import current_principal
from bimip.core.clock import timestamp
from bimip.core.errors import BimipError, answer, invalid
from bimip.core.streams import open_frame
from bimip.messaging.v1 import messaging_pb2
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc
from services.sync.core import SyncCore, check_version

Context = grpc.aio.ServicerContext[Any, Any]

MAX_LOCAL_SEQ_BYTES = 128
REQUEST_KINDS = ("delta", "stream_delta", "snapshot", "resume", "hello")
ENTRY_KINDS = ("delta", "stream_delta", "hello", "resume")
STREAM_KINDS = ("stream_delta", "hello")


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    """Delta, snapshot, resume, hello and devices (SPEC S1–S6)."""

    def __init__(self, core: SyncCore) -> None:
        self.core = core
        metrics = core.metrics
        self._requests = {kind: metrics.sync_requests.labels(kind) for kind in REQUEST_KINDS}
        self._entries = {kind: metrics.sync_entries.labels(kind) for kind in ENTRY_KINDS}
        self._open = {kind: metrics.open_streams.labels("sync", kind) for kind in STREAM_KINDS}

    async def GetDelta(
        self, request: sync_pb2.GetDeltaRequest, context: Context
    ) -> sync_pb2.GetDeltaResponse:
        me = current_principal()
        self._requests["delta"].inc()
        response = await answer(
            self.core.delta(me.eid, me.device_id, request.since_version, request.page_size), context
        )
        self._entries["delta"].inc(len(response.entries))
        return response

    async def StreamDelta(
        self, request: sync_pb2.StreamDeltaRequest, context: Context
    ) -> AsyncIterator[sync_pb2.StreamDeltaResponse]:
        me = current_principal()
        self._requests["stream_delta"].inc()
        self._open["stream_delta"].inc()
        try:
            size = self.core.page_size(request.page_size)
            async with aclosing(self.core.pages(me.eid, me.device_id, request.since_version, size)) as pages:
                async for page in pages:
                    self._entries["stream_delta"].inc(len(page.entries))
                    yield sync_pb2.StreamDeltaResponse(page=page)
        except BimipError as err:
            await err.abort(context)
        finally:
            self._open["stream_delta"].dec()

    async def GetSnapshot(
        self, request: sync_pb2.GetSnapshotRequest, context: Context
    ) -> sync_pb2.GetSnapshotResponse:
        me = current_principal()
        self._requests["snapshot"].inc()
        snapshot = await answer(self.core.snapshot(me.eid, me.device_id, request.version), context)
        return sync_pb2.GetSnapshotResponse(snapshot=snapshot)

    async def ResumeSnapshot(
        self, request: sync_pb2.ResumeSnapshotRequest, context: Context
    ) -> sync_pb2.ResumeSnapshotResponse:
        me = current_principal()
        self._requests["resume"].inc()
        response = await answer(self.core.resume(me.eid, me.device_id, request), context)
        self._entries["resume"].inc(sum(len(repair.entries) for repair in response.repairs))
        return response

    async def ListDevices(
        self, request: sync_pb2.ListDevicesRequest, context: Context
    ) -> sync_pb2.ListDevicesResponse:
        return await answer(self.core.devices(current_principal().eid), context)

    async def Hello(
        self, request_iterator: AsyncIterator[sync_pb2.HelloRequest], context: Context
    ) -> AsyncIterator[sync_pb2.HelloResponse]:
        me = current_principal()
        core = self.core
        self._requests["hello"].inc()
        self._open["hello"].inc()
        try:
            first = await open_frame(request_iterator, core.settings.heartbeat_interval_s * 3)
            if first is None:
                return
            check_version(first.open.last_version, "last_version")
            uploads = await self._uploads(first, request_iterator)
            # Appended in local-sequence order (S5); each refused on its own.
            accepted: list[sync_pb2.OfflineMessage] = []
            for upload in uploads:
                problem = _local_seq_problem(upload.local_seq)
                if problem is not None:
                    refusal = invalid("INVALID_LOCAL_SEQ", problem, field="local_seq").to_proto()
                    yield _appended(first.seq, upload, upload.message.client_id, error=refusal)
                else:
                    accepted.append(upload)
            accepted.sort(key=lambda upload: upload.local_seq)
            results = await core.append(me.eid, me.device_id, [upload.message for upload in accepted])
            for upload, result in zip(accepted, results, strict=True):
                outcome = result.error if result.HasField("error") else None
                yield _appended(first.seq, upload, result.client_id, error=outcome, ack=result.ack)
            # What the device has not seen: its own entries (the uploads too) are left out (S1).
            head = first.open.last_version
            size = core.settings.delta_page_size
            async with aclosing(core.pages(me.eid, me.device_id, first.open.last_version, size)) as pages:
                async for page in pages:
                    head = page.head
                    if page.entries:
                        self._entries["hello"].inc(len(page.entries))
                        yield sync_pb2.HelloResponse(seq=first.seq, page=page)
            yield sync_pb2.HelloResponse(seq=first.seq, end=sync_pb2.HelloEnd(head=head))
            async for frame in request_iterator:
                yield await self._after_end(me.eid, me.device_id, frame)
        except BimipError as err:
            await err.abort(context)
        finally:
            self._open["hello"].dec()

    async def _uploads(
        self, first: sync_pb2.HelloRequest, requests: AsyncIterator[sync_pb2.HelloRequest]
    ) -> list[sync_pb2.OfflineMessage]:
        limit = self.core.settings.hello_max_messages
        uploads = list(first.open.messages)
        more = first.open.more
        while True:
            if len(uploads) > limit:
                # Nothing is appended: the client sends the same messages again in smaller hellos.
                raise invalid(
                    "BATCH_TOO_LARGE", f"at most {limit} offline messages per hello", limit=str(limit)
                )
            if not more:
                return uploads
            frame = await anext(requests, None)
            if frame is None or frame.WhichOneof("frame") != "upload":
                raise BimipError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "UPLOAD_EXPECTED",
                    "`more` was set: the next frame must be `upload`",
                )
            uploads.extend(frame.upload.messages)
            more = frame.upload.more

    async def _after_end(
        self, eid: str, device_id: str, frame: sync_pb2.HelloRequest
    ) -> sync_pb2.HelloResponse:
        kind = frame.WhichOneof("frame")
        try:
            if kind == "ack":
                cursor = await self.core.ack(eid, device_id, frame.ack.offset)
                return sync_pb2.HelloResponse(seq=frame.seq, acked=sync_pb2.HelloAcked(cursor=cursor))
            if kind == "heartbeat":
                beat = common_pb2.Heartbeat(sent_at=timestamp(self.core.clock.now()))
                return sync_pb2.HelloResponse(seq=frame.seq, heartbeat=beat)
            raise BimipError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "FRAME_UNEXPECTED",
                f"after `end` only `ack` and `heartbeat` frames are accepted, not {kind or 'an empty frame'}",
            )
        except BimipError as err:
            if err.code == grpc.StatusCode.UNAVAILABLE:
                raise
            return sync_pb2.HelloResponse(seq=frame.seq, error=err.to_proto())


def _local_seq_problem(local_seq: str) -> str | None:
    if not local_seq:
        return "local_seq is required (a sortable local sequence such as timestamp:counter:device)"
    if len(local_seq.encode()) > MAX_LOCAL_SEQ_BYTES:
        return f"local_seq is longer than {MAX_LOCAL_SEQ_BYTES} bytes"
    if not local_seq.isprintable():
        return "local_seq has control characters"
    return None


def _appended(
    seq: int,
    upload: sync_pb2.OfflineMessage,
    client_id: str,
    *,
    error: common_pb2.Error | None,
    ack: messaging_pb2.SendAck | None = None,
) -> sync_pb2.HelloResponse:
    """One upload's outcome: its offset and signal_id, or why it was refused."""
    appended = sync_pb2.HelloAppended(client_id=client_id, local_seq=upload.local_seq)
    if error is not None:
        appended.error.CopyFrom(error)
    elif ack is not None:
        appended.offset, appended.signal_id, appended.duplicate = ack.offset, ack.signal_id, ack.duplicate
    return sync_pb2.HelloResponse(seq=seq, appended=appended)

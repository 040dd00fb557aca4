"""A small test client of the messaging Connect stream: one `Device` per open stream.

It records every frame the server sends, by kind, and offers the client's verbs (send, ack, mark,
command). Waiting is always polling with a deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bimip.common.v1 import common_pb2
from bimip.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from bimip.sdk.frames import deliveries_in
from tests.helpers import eventually
from tests.streams import RecordedCall


def message(
    to: str, client_id: str, payload: bytes = b"hi", *, device: str = "", **fields: Any
) -> common_pb2.Message:
    return common_pb2.Message(
        client_id=client_id,
        recipient=common_pb2.Identity(eid=to, device_id=device),
        type=fields.pop("type", common_pb2.MESSAGE_TYPE_CHAT),
        payload=payload,
        **fields,
    )


class Device(RecordedCall):
    """An open Connect stream of one device."""

    def __init__(self, eid: str, device_id: str, call: Any, opened: messaging_pb2.OpenResponse) -> None:
        super().__init__(call)
        self.eid = eid
        self.device_id = device_id
        self.opened = opened

    # --- what arrived ------------------------------------------------------------------------

    def answer(self, seq: int) -> messaging_pb2.ConnectResponse | None:
        return next(
            (
                f
                for f in self.frames
                if f.seq == seq and f.WhichOneof("frame") not in ("delivery", "deliveries")
            ),
            None,
        )

    @property
    def deliveries(self) -> list[messaging_pb2.Delivery]:
        """Every delivery, in arrival order, whether it came alone or in a `deliveries` frame."""
        return [delivery for frame in self.frames for delivery, _ in deliveries_in(frame)]

    def entries(self, *, replay: bool = False) -> list[common_pb2.Entry]:
        return [d.entry for d in self.deliveries if d.replay == replay]

    def messages(self) -> list[common_pb2.Message]:
        return [e.message for e in self.entries() if e.WhichOneof("body") == "message"]

    def receipts(self) -> list[common_pb2.Receipt]:
        return [e.receipt for e in self.entries() if e.WhichOneof("body") == "receipt"]

    def offsets(self) -> list[int]:
        return [e.offset for e in self.entries()]

    # --- verbs -------------------------------------------------------------------------------

    async def write(self, **frame: Any) -> int:
        seq = next(self._seq)
        await self.call.write(messaging_pb2.ConnectRequest(seq=seq, **frame))
        return seq

    async def reply(self, seq: int, timeout: float = 15.0) -> messaging_pb2.ConnectResponse:
        return await eventually(lambda: self.answer(seq), timeout=timeout)  # type: ignore[no-any-return]

    async def send(self, msg: common_pb2.Message) -> messaging_pb2.ConnectResponse:
        return await self.reply(await self.write(send=messaging_pb2.SendRequest(message=msg)))

    async def sent(self, msg: common_pb2.Message) -> messaging_pb2.SendAck:
        response = await self.send(msg)
        assert response.WhichOneof("frame") == "sent", response
        return response.sent

    async def ack(self, offset: int) -> messaging_pb2.ConnectResponse:
        return await self.reply(await self.write(ack=messaging_pb2.AckRequest(offset=offset)))

    async def mark(self, status: int, **target: Any) -> messaging_pb2.ConnectResponse:
        return await self.reply(await self.write(mark=messaging_pb2.MarkRequest(status=status, **target)))

    async def command(self, **command: Any) -> messaging_pb2.ConnectResponse:
        return await self.reply(
            await self.write(command=messaging_pb2.CommandRequest(command=common_pb2.Command(**command)))
        )

    async def wait_entries(self, count: int, timeout: float = 15.0) -> list[common_pb2.Entry]:
        await eventually(lambda: len(self.entries()) >= count, timeout=timeout)
        return self.entries()

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> Any:
        return await eventually(predicate, timeout=timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call.done_writing()
        await self.stop_reading()


async def connect(
    channel: grpc.aio.Channel,
    token: str,
    eid: str,
    device_id: str,
    processed_offset: int = 0,
    max_batch: int = 0,
) -> Device:
    stub = messaging_pb2_grpc.MessagingServiceStub(channel)
    call = stub.Connect(metadata=(("authorization", f"Bearer {token}"),))
    opening = messaging_pb2.OpenRequest(processed_offset=processed_offset, max_batch=max_batch)
    await call.write(messaging_pb2.ConnectRequest(seq=0, open=opening))
    first = await call.read()
    assert first.WhichOneof("frame") == "opened", first
    return Device(eid, device_id, call, first.opened)


@contextlib.asynccontextmanager
async def devices(
    suite: Any, *names: str, channel: grpc.aio.Channel | None = None, max_batch: int = 0
) -> AsyncIterator[list[Device]]:
    """Open a stream for each "eid/device" name (taking up to `max_batch` entries per frame);
    close them all at the end."""
    own = channel is None
    channel = channel or suite.channel("messaging")
    opened: list[Device] = []
    try:
        for name in names:
            eid, device_id = name.split("/")
            token = suite.token(eid, device_id)
            opened.append(await connect(channel, token, eid, device_id, max_batch=max_batch))
        yield opened
    finally:
        for device in opened:
            await device.close()
        if own:
            await channel.close()

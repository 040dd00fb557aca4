"""Applications using the SDK against real servers, for the SDK's tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bimip.sdk import Client, MessageReceived, ReceiptUpdated
from tests.suite import Suite


class App:
    """An application using one Client: it records every event it is given."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Any] = []
        self._task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for event in self.client.events():
            self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def received(self) -> list[str]:
        return [e.message.client_id for e in self.of(MessageReceived)]

    def statuses(self, client_id: str) -> list[int]:
        return [e.receipt.status for e in self.of(ReceiptUpdated) if e.receipt.client_id == client_id]

    async def stop(self) -> None:
        await self.client.close()
        await asyncio.wait_for(self._task, 10)


@contextlib.asynccontextmanager
async def apps(suite: Suite, tmp_path: Path, *names: str, **options: Any) -> AsyncIterator[list[App]]:
    started: list[App] = []
    try:
        for name in names:
            eid, device = name.split("/")
            client = Client(
                suite.token(eid, device),
                messaging=suite.address("messaging"),
                sync=suite.address("sync"),
                store=tmp_path / f"{eid}-{device}.db",
                **{
                    "awareness": suite.address("awareness") if "awareness" in suite.services else None,
                    "backoff": (0.05, 0.5),
                    **options,
                },
            )
            await client.start()
            started.append(App(client))
        yield started
    finally:
        for app in started:
            await app.stop()

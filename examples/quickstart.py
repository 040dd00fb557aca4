"""BIMIP quick start: Alice sends Bob a message; Bob's phone receives it and reads it; Alice's
laptop sees it DELIVERED, then READ.

Start the services in one terminal (`make run`), then in another:

    .venv/bin/python examples/quickstart.py
"""

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from bimip.sdk import DELIVERED, READ, Client, MessageReceived, ReceiptUpdated


def dev_token(user: str, device: str) -> str:
    """A development token, as `bimip token issue` prints it."""
    command = [sys.executable, "-m", "bimip.cli", "token", "issue", "--user", user, "--device", device]
    return subprocess.check_output(command, text=True).strip()


async def main(addresses: dict[str, str]) -> None:
    home = Path(tempfile.mkdtemp())  # each device keeps its outbox and position in a SQLite file
    alice = Client(dev_token("alice@example.com", "laptop"), store=home / "alice.db", **addresses)
    bob = Client(dev_token("bob@example.com", "phone"), store=home / "bob.db", **addresses)
    async with alice, bob:
        sent = await alice.send("bob@example.com", b"Hello, Bob!")  # returns at SENT
        print(f"alice: sent, offset {sent.offset}")

        async for event in bob.events():  # acked for Bob once he asks for the next event
            if isinstance(event, MessageReceived):
                print(f"bob: {event.message.sender.eid} says {event.message.payload.decode()!r}")
                await bob.mark_read(event.message.signal_id)
                break

        names = {DELIVERED: "DELIVERED", READ: "READ"}
        async for event in alice.events():
            if isinstance(event, ReceiptUpdated) and event.receipt.signal_id == sent.signal_id:
                print(f"alice: {names.get(event.receipt.status, event.receipt.status)}")
                if event.receipt.status == READ:
                    break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messaging", default="127.0.0.1:50051")
    parser.add_argument("--awareness", default="127.0.0.1:50052")
    parser.add_argument("--sync", default="127.0.0.1:50053")
    asyncio.run(main(vars(parser.parse_args())))

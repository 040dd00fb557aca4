"""Subscriptions and blocks (SPEC A6), and the block reaching messaging over PresenceLink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from bimip.awareness.v1 import awareness_pb2 as aw
from bimip.awareness.v1 import awareness_pb2_grpc
from bimip.core.errors import reason_of
from tests.conftest import Backend
from tests.messaging_client import devices, message
from tests.suite import Suite, running_suite

A, B, C = "alice@example.com", "bob@example.com", "carol@example.com"
PENDING, APPROVED = aw.SUBSCRIPTION_STATE_PENDING, aw.SUBSCRIPTION_STATE_APPROVED
DENIED = aw.SUBSCRIPTION_STATE_DENIED


@pytest.fixture
async def suite(backend: Backend, tmp_path: Path) -> AsyncIterator[Suite]:
    async with running_suite(backend, tmp_path, ["messaging", "awareness"]) as suite:
        yield suite


class Client:
    """One user's awareness calls."""

    def __init__(self, suite: Suite, channel: grpc.aio.Channel, eid: str) -> None:
        self.stub = awareness_pb2_grpc.AwarenessServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {suite.token(eid, 'phone')}"),)

    async def __call__(self, method: str, request: Any) -> Any:
        return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=30)

    async def refused(self, method: str, request: Any) -> tuple[grpc.StatusCode, str | None]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await self(method, request)
        return err.value.code(), reason_of(err.value)

    async def listed(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
        got = await self("ListSubscriptions", aw.ListSubscriptionsRequest())
        return (
            [(s.target_eid, s.state) for s in got.subscriptions],
            [(s.subscriber_eid, s.state) for s in got.subscribers],
            list(got.blocked_eids),
        )


@pytest.fixture
async def users(suite: Suite) -> AsyncIterator[tuple[Client, Client, Client]]:
    async with suite.channel("awareness") as channel:
        yield Client(suite, channel, A), Client(suite, channel, B), Client(suite, channel, C)


async def test_request_approve_deny_unsubscribe_list(users: tuple[Client, Client, Client]) -> None:
    alice, bob, carol = users
    asked = await alice("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=B))
    assert (asked.subscription.subscriber_eid, asked.subscription.target_eid, asked.subscription.state) == (
        A,
        B,
        PENDING,
    )
    again = await alice("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=B))
    assert again.subscription.state == PENDING  # asking twice is one request
    assert await bob.listed() == ([], [(A, PENDING)], [])
    approved = await bob("ApproveSubscription", aw.ApproveSubscriptionRequest(subscriber_eid=A))
    assert approved.subscription.state == APPROVED
    assert await alice.listed() == ([(B, APPROVED)], [], [])  # one way: bob does not see alice
    assert await bob.listed() == ([], [(A, APPROVED)], [])
    # Carol's request is denied; she sees the denial, bob no longer lists her.
    await carol("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=B))
    denied = await bob("DenySubscription", aw.DenySubscriptionRequest(subscriber_eid=C))
    assert denied.subscription.state == DENIED
    assert await carol.listed() == ([(B, DENIED)], [], [])
    assert await bob.listed() == ([], [(A, APPROVED)], [])
    # Denying an approved subscriber revokes it; unsubscribing ends one's own.
    await bob("DenySubscription", aw.DenySubscriptionRequest(subscriber_eid=A))
    assert await alice.listed() == ([(B, DENIED)], [], [])
    await carol("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=B))  # may ask again
    await carol("Unsubscribe", aw.UnsubscribeRequest(target_eid=B))
    assert await carol.listed() == ([], [], [])
    await carol("Unsubscribe", aw.UnsubscribeRequest(target_eid=B))  # nothing to end: a no-op


async def test_bad_subscription_requests(users: tuple[Client, Client, Client]) -> None:
    alice, bob, _ = users
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert await alice.refused("RequestSubscription", aw.RequestSubscriptionRequest(target_eid="")) == (
        invalid,
        "INVALID_EID",
    )
    assert await alice.refused("RequestSubscription", aw.RequestSubscriptionRequest(target_eid="bob")) == (
        invalid,
        "INVALID_EID",
    )
    assert await alice.refused("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=A)) == (
        invalid,
        "SELF_SUBSCRIPTION",
    )
    assert await alice.refused("Block", aw.BlockRequest(eid=A)) == (invalid, "SELF_SUBSCRIPTION")
    assert await alice.refused("Block", aw.BlockRequest(eid="x" * 300 + "@example.com")) == (
        invalid,
        "INVALID_EID",
    )
    no_request = (grpc.StatusCode.FAILED_PRECONDITION, "NO_PENDING_REQUEST")
    assert (
        await bob.refused("ApproveSubscription", aw.ApproveSubscriptionRequest(subscriber_eid=A))
        == no_request
    )
    assert await bob.refused("DenySubscription", aw.DenySubscriptionRequest(subscriber_eid=A)) == no_request
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await alice.stub.ListSubscriptions(aw.ListSubscriptionsRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_block_ends_subscriptions_both_ways_and_messaging_refuses(
    suite: Suite, users: tuple[Client, Client, Client]
) -> None:
    alice, bob, _ = users
    await alice("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=B))
    await bob("ApproveSubscription", aw.ApproveSubscriptionRequest(subscriber_eid=A))
    await bob("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=A))  # pending the other way
    async with devices(suite, f"{A}/a1", f"{B}/b1") as (a1, b1):
        before = await a1.sent(message(B, "before"))
        await bob("Block", aw.BlockRequest(eid=A))
        assert await alice.listed() == ([], [], [])  # both directions ended, the pending one too
        assert await bob.listed() == ([], [], [A])
        for device, to in ((a1, B), (b1, A)):
            refused = await device.send(message(to, "after-block"))
            assert (refused.error.code, refused.error.reason) == (
                grpc.StatusCode.PERMISSION_DENIED.value[0],
                "BLOCKED",
            )
        assert await alice.refused("RequestSubscription", aw.RequestSubscriptionRequest(target_eid=B)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "BLOCKED",
        )
        (entry,) = await b1.wait_entries(1)  # already in the log: still delivered
        assert entry.message.signal_id == before.signal_id
        await bob("Unblock", aw.UnblockRequest(eid=A))
        assert await alice.listed() == ([], [], [])  # an unblock restores nothing
        assert (await a1.sent(message(B, "after-unblock"))).offset == 2


async def test_block_fails_clearly_while_messaging_is_down(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(
        backend, tmp_path, ["awareness"], BIMIP_MESSAGING_ADDRESS="127.0.0.1:9"
    ) as suite:
        async with suite.channel("awareness") as channel:
            alice = Client(suite, channel, A)
            assert await alice.refused("Block", aw.BlockRequest(eid=B)) == (
                grpc.StatusCode.UNAVAILABLE,
                "MESSAGING_UNAVAILABLE",
            )
            # The block is kept; retrying once messaging is back tells messaging (idempotent).
            assert await alice.listed() == ([], [], [B])

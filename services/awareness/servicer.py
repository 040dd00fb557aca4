"""gRPC face of the awareness service.

Subscriptions and blocks (SPEC A6) are served. Presence, intent, visibility and activity (the
Connect stream, SetIntent, SetVisibility) are not built yet: they answer UNIMPLEMENTED (reason
NOT_IMPLEMENTED) through the generated base class; authentication already applies.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from bimip.awareness.v1 import awareness_pb2, awareness_pb2_grpc
from bimip.core.auth import current_principal
from bimip.core.errors import BimipError
from services.awareness.subscriptions import Subscriptions

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


async def _answer(work: Awaitable[T], context: Context) -> T:
    try:
        return await work
    except BimipError as err:
        await err.abort(context)


class AwarenessServicer(awareness_pb2_grpc.AwarenessServiceServicer):
    """Presence, intent, activity and subscriptions (SPEC §2)."""

    def __init__(self, subscriptions: Subscriptions) -> None:
        self.subscriptions = subscriptions

    async def RequestSubscription(
        self, request: awareness_pb2.RequestSubscriptionRequest, context: Context
    ) -> awareness_pb2.RequestSubscriptionResponse:
        caller = current_principal().eid
        subscription = await _answer(self.subscriptions.request(caller, request.target_eid), context)
        return awareness_pb2.RequestSubscriptionResponse(subscription=subscription)

    async def ApproveSubscription(
        self, request: awareness_pb2.ApproveSubscriptionRequest, context: Context
    ) -> awareness_pb2.ApproveSubscriptionResponse:
        caller = current_principal().eid
        subscription = await _answer(
            self.subscriptions.answer(caller, request.subscriber_eid, approve=True), context
        )
        return awareness_pb2.ApproveSubscriptionResponse(subscription=subscription)

    async def DenySubscription(
        self, request: awareness_pb2.DenySubscriptionRequest, context: Context
    ) -> awareness_pb2.DenySubscriptionResponse:
        caller = current_principal().eid
        subscription = await _answer(
            self.subscriptions.answer(caller, request.subscriber_eid, approve=False), context
        )
        return awareness_pb2.DenySubscriptionResponse(subscription=subscription)

    async def Unsubscribe(
        self, request: awareness_pb2.UnsubscribeRequest, context: Context
    ) -> awareness_pb2.UnsubscribeResponse:
        await _answer(self.subscriptions.unsubscribe(current_principal().eid, request.target_eid), context)
        return awareness_pb2.UnsubscribeResponse()

    async def Block(
        self, request: awareness_pb2.BlockRequest, context: Context
    ) -> awareness_pb2.BlockResponse:
        await _answer(self.subscriptions.block(current_principal().eid, request.eid, blocked=True), context)
        return awareness_pb2.BlockResponse()

    async def Unblock(
        self, request: awareness_pb2.UnblockRequest, context: Context
    ) -> awareness_pb2.UnblockResponse:
        await _answer(self.subscriptions.block(current_principal().eid, request.eid, blocked=False), context)
        return awareness_pb2.UnblockResponse()

    async def ListSubscriptions(
        self, request: awareness_pb2.ListSubscriptionsRequest, context: Context
    ) -> awareness_pb2.ListSubscriptionsResponse:
        return await _answer(self.subscriptions.list(current_principal().eid), context)

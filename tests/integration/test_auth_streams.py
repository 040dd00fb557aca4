"""Open streams are closed with UNAUTHENTICATED within one heartbeat interval of their token being
revoked or expiring (SPEC X2) — against the in-process and the Redis revocation stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest

from bimip.core.auth import (
    AuthInterceptor,
    InProcessRevocations,
    Keys,
    RedisRevocations,
    Revocations,
    issue_client_token,
)
from bimip.core.clock import FakeClock
from bimip.core.errors import reason_of
from tests.conftest import Backend
from tests.helpers import eventually

INTERVAL = 10.0
KEYS = Keys("HS256", "k" * 32, "k" * 32, "i" * 32, "bimip", "bimip")


def _identity(b: bytes) -> bytes:
    return b


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
    async for request in requests:
        yield request


@pytest.fixture
async def revocations(backend: Backend) -> AsyncIterator[Revocations]:
    if backend.redis_url is None:
        yield InProcessRevocations()
        return
    import redis.asyncio as aioredis

    client = aioredis.from_url(backend.redis_url)
    yield RedisRevocations(client, backend.namespace)
    await client.aclose()


@pytest.fixture
async def echo_server(revocations: Revocations) -> AsyncIterator[tuple[str, FakeClock, AuthInterceptor]]:
    clock = FakeClock(start=datetime.now(UTC))
    auth = AuthInterceptor(KEYS, revocations, clock, sweep_interval=INTERVAL)
    server = grpc.aio.server(interceptors=[auth])
    handler = grpc.stream_stream_rpc_method_handler(_echo, _identity, _identity)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {"Stream": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await auth.start()
    yield f"127.0.0.1:{port}", clock, auth
    await auth.stop()
    await server.stop(0)


async def _advance(clock: FakeClock, seconds: float) -> None:
    """Move time one sweep interval at a time, letting each sweep (real I/O) reach its next sleep."""
    for _ in range(round(seconds / INTERVAL)):
        await eventually(lambda: clock.sleepers >= 1)
        await clock.advance(INTERVAL)


async def _open(channel: grpc.aio.Channel, token: str) -> grpc.aio.StreamStreamCall:  # type: ignore[type-arg]
    method = channel.stream_stream(
        "/test.Echo/Stream", request_serializer=_identity, response_deserializer=_identity
    )
    call = method(metadata=(("authorization", f"Bearer {token}"),))
    await call.write(b"hello")
    assert await call.read() == b"hello"
    return call


async def test_revoked_token_closes_its_open_stream_only(
    echo_server: tuple[str, FakeClock, AuthInterceptor], revocations: Revocations
) -> None:
    address, clock, auth = echo_server
    revoked = issue_client_token(KEYS, "alice@example.com", "phone", timedelta(hours=1))
    kept = issue_client_token(KEYS, "bob@example.com", "laptop", timedelta(hours=1))
    async with grpc.aio.insecure_channel(address) as channel:
        doomed = await _open(channel, revoked)
        other = await _open(channel, kept)
        assert auth.open_streams == 2
        jti = jwt.decode(revoked, options={"verify_signature": False})["jti"]
        await revocations.revoke(jti, datetime.now(UTC).timestamp() + 3600)
        await _advance(clock, INTERVAL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await doomed.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err.value) == "TOKEN_REVOKED"
        # The other stream goes on.
        await other.write(b"still here")
        assert await other.read() == b"still here"
        await eventually(lambda: auth.open_streams == 1)
        # And the revoked token cannot open a new stream.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _open(channel, revoked)
        assert reason_of(err.value) == "TOKEN_REVOKED"


async def test_expired_token_closes_its_open_stream_within_one_interval(
    echo_server: tuple[str, FakeClock, AuthInterceptor],
) -> None:
    address, clock, _ = echo_server
    token = issue_client_token(KEYS, "alice@example.com", "phone", timedelta(seconds=25))
    async with grpc.aio.insecure_channel(address) as channel:
        call = await _open(channel, token)
        await _advance(clock, INTERVAL)  # t+10 s: still valid
        await call.write(b"ping")
        assert await call.read() == b"ping"
        await _advance(clock, 2 * INTERVAL)  # t+30 s: expired at 25 s, closed at the sweep after it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err.value) == "TOKEN_EXPIRED"

"""The bootstrap every service shares: health, reflection, auth and graceful shutdown, on both backends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bimip.admin.v1 import admin_pb2, admin_pb2_grpc
from bimip.awareness.v1 import awareness_pb2, awareness_pb2_grpc
from bimip.core.auth import ServiceCredentials, issue_service_token
from bimip.core.errors import reason_of
from bimip.messaging.v1 import internal_pb2, internal_pb2_grpc, messaging_pb2, messaging_pb2_grpc
from bimip.sync.v1 import sync_pb2, sync_pb2_grpc
from tests.conftest import Backend
from tests.helpers import eventually
from tests.suite import JWT_SECRET, Suite, running_suite

SERVICES = {
    "messaging": ["bimip.messaging.v1.MessagingService", "bimip.messaging.v1.MessagingInternalService"],
    "awareness": ["bimip.awareness.v1.AwarenessService"],
    "sync": ["bimip.sync.v1.SyncService"],
}


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def reflected_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests(), timeout=5):
        return {s.name for s in response.list_services_response.service}
    raise AssertionError("no reflection response")


async def _assert_serving(suite: Suite, name: str) -> None:
    async with suite.channel(name) as channel:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        for service in SERVICES[name]:
            assert await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING
        listed = await reflected_services(channel)
        assert set(SERVICES[name]) <= listed
        assert {"grpc.health.v1.Health", "bimip.admin.v1.AdminService"} <= listed
        # Reflection serves the schema too, so grpcurl-style tools can call the service.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICES[name][0])

        async for response in stub.ServerReflectionInfo(ask(), timeout=5):
            assert response.file_descriptor_response.file_descriptor_proto
            break


async def test_all_three_together_report_serving_and_reflect(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path) as suite:
        assert len({s.port for s in suite.services.values()}) == 3
        for name in SERVICES:
            await _assert_serving(suite, name)


@pytest.mark.parametrize("name", list(SERVICES))
async def test_each_service_alone_reports_serving(backend: Backend, tmp_path: Path, name: str) -> None:
    async with running_suite(backend, tmp_path, [name]) as suite:
        assert list(suite.services) == [name]
        await _assert_serving(suite, name)


async def test_health_follows_the_database(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["sync"], BIMIP_HEALTH_CHECK_INTERVAL_S="0.05") as suite:
        async with suite.channel("sync") as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            # Break the database connection pool for real: dispose, then point at nothing.
            runtime = suite.services["sync"].runtime
            good = runtime.engine
            from bimip.core.storage import create_engine

            bad_url = (
                "postgresql+asyncpg://postgres@127.0.0.1:1/nothing"
                if backend.name == "scale"
                else f"sqlite+aiosqlite:///{tmp_path}/missing-dir/\0/x.db"
            )
            try:
                runtime.engine = (
                    create_engine(bad_url) if backend.name == "scale" else _broken_sqlite(tmp_path)
                )
                await eventually(lambda: _is(channel, health_pb2.HealthCheckResponse.NOT_SERVING), timeout=10)
                # Readiness fails, liveness does not: restarting the process would not help.
                assert await health_status(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING
            finally:
                await runtime.engine.dispose()
                runtime.engine = good
            await eventually(lambda: _is(channel, health_pb2.HealthCheckResponse.SERVING), timeout=10)


async def test_not_ready_until_the_database_is_migrated(backend: Backend, tmp_path: Path) -> None:
    """A deployment starts its pods while the migration step may still run: they answer liveness
    but are not ready until the schema is the code's."""
    from bimip.core.storage import migrate

    env = {"BIMIP_MIGRATE_ON_START": "false", "BIMIP_HEALTH_CHECK_INTERVAL_S": "0.05"}
    async with running_suite(backend, tmp_path, ["sync"], **env) as suite:
        async with suite.channel("sync") as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await health_status(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING
            await migrate(suite.services["sync"].runtime.settings.database_url)
            await eventually(lambda: _is(channel, health_pb2.HealthCheckResponse.SERVING), timeout=10)


def test_a_newer_schema_is_current_an_older_one_is_not() -> None:
    """During a rolling upgrade the new release's migration runs first: the old pods stay ready."""
    from bimip.core.storage import head_revision, schema_is_current

    assert schema_is_current(head_revision())
    assert schema_is_current("9999_from_a_newer_release")
    assert not schema_is_current("0001") and not schema_is_current(None)


def _broken_sqlite(tmp_path: Path):  # type: ignore[no-untyped-def]
    from bimip.core.storage import create_engine

    # A database file inside a directory that is then made unreadable and unwritable.
    d = tmp_path / "locked"
    d.mkdir()
    engine = create_engine(f"sqlite+aiosqlite:///{d}/x.db")
    (d / "x.db").mkdir()  # a directory where the file should be: every open fails
    return engine


async def _is(channel: grpc.aio.Channel, status: int) -> bool:
    return await health_status(channel) == status


# --- authentication ---------------------------------------------------------------------------


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "bimip",
        "aud": "bimip",
        "sub": "alice@example.com",
        "device": "phone",
        "iat": now,
        "exp": now + 600,
        "jti": "jti-1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _forge(**overrides: object) -> str:
    return jwt.encode(_claims(**overrides), JWT_SECRET, algorithm="HS256")


def _alg_none() -> str:
    return jwt.encode(_claims(), None, algorithm="none")  # type: ignore[arg-type]


BAD_TOKENS = {
    "malformed": ("not.a.jwt", "TOKEN_INVALID"),
    "wrong signature": (
        jwt.encode(_claims(), "another-secret-0123456789abcdef!", algorithm="HS256"),
        "TOKEN_SIGNATURE",
    ),
    "expired": (_forge(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200), "TOKEN_EXPIRED"),
    "alg none": (_alg_none(), "TOKEN_ALGORITHM"),
    "no device claim": (_forge(device=None), "TOKEN_CLAIMS"),
    "no jti": (_forge(jti=None), "TOKEN_CLAIMS"),
    "bad eid": (_forge(sub="not-an-eid"), "TOKEN_CLAIMS"),
    "overlong device": (_forge(device="d" * 257), "TOKEN_CLAIMS"),
    "wrong audience": (_forge(aud="someone-else"), "TOKEN_AUDIENCE"),
}


async def _call_unary(suite: Suite, metadata: tuple[tuple[str, str], ...] | None) -> None:
    async with suite.channel("messaging") as channel:
        stub = messaging_pb2_grpc.MessagingServiceStub(channel)
        await stub.GetCommitOffset(messaging_pb2.GetCommitOffsetRequest(), metadata=metadata, timeout=30)


async def _call_stream(
    suite: Suite, metadata: tuple[tuple[str, str], ...] | None, *, accepted: bool = False
) -> None:
    """Open an awareness stream. A call the server refuses ends before any frame is read, so
    nothing is written to it: a write that loses the race to the refusal fails on the client's
    side, and grpc.aio then reports the call as INTERNAL in place of the status the server sent.
    An `accepted` call is sent its open frame and must answer `opened`."""
    async with suite.channel("awareness") as channel:
        stub = awareness_pb2_grpc.AwarenessServiceStub(channel)
        call = stub.Connect(metadata=metadata, timeout=30)
        if accepted:
            await call.write(awareness_pb2.ConnectRequest(open=awareness_pb2.OpenRequest()))
        first = await call.read()
        assert first.WhichOneof("frame") == "opened", first
        call.cancel()


@pytest.fixture
async def suite(backend: Backend, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_suite(backend, tmp_path) as suite:
        yield suite


async def test_missing_and_bad_tokens_are_unauthenticated(suite: Suite) -> None:
    for call in (_call_unary, _call_stream):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(suite, None)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err.value) == "TOKEN_MISSING"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(suite, (("authorization", "Basic abc"),))
        assert reason_of(err.value) == "TOKEN_MISSING"
        for label, (token, reason) in BAD_TOKENS.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(suite, (("authorization", f"Bearer {token}"),))
            got = (err.value.code(), reason_of(err.value))
            assert got == (grpc.StatusCode.UNAUTHENTICATED, reason), f"{call.__name__} {label}: {err.value!r}"


async def test_valid_token_reaches_the_service(suite: Suite) -> None:
    token = suite.token("alice@example.com", "phone")
    await _call_unary(suite, (("authorization", f"Bearer {token}"),))
    await _call_stream(suite, (("authorization", f"Bearer {token}"),), accepted=True)
    async with suite.channel("sync") as channel:
        answer = await sync_pb2_grpc.SyncServiceStub(channel).GetDelta(
            sync_pb2.GetDeltaRequest(), metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
    assert (answer.head, list(answer.entries)) == (0, [])


async def test_health_and_reflection_need_no_token(suite: Suite) -> None:
    for name in SERVICES:
        async with suite.channel(name) as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await reflected_services(channel)


async def test_revoked_token_is_refused_everywhere(suite: Suite) -> None:
    token = suite.token("alice@example.com", "phone")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    async with suite.channel("sync") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.RevokeToken(
            admin_pb2.RevokeTokenRequest(token_id=jti),
            metadata=ServiceCredentials(suite.keys, "test").metadata(),
            timeout=5,
        )
    # Revoked through sync's admin; messaging refuses it too (shared revocations: Redis, or the process).
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _call_unary(suite, (("authorization", f"Bearer {token}"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(err.value) == "TOKEN_REVOKED"


async def test_internal_rpcs_refuse_client_tokens_and_client_rpcs_refuse_service_tokens(suite: Suite) -> None:
    client = suite.token("alice@example.com", "phone")
    service = issue_service_token(suite.keys, "sync")
    async with suite.channel("messaging") as channel:
        internal = internal_pb2_grpc.MessagingInternalServiceStub(channel)
        call = internal.LogLink(metadata=(("authorization", f"Bearer {client}"),), timeout=5)
        await call.write(internal_pb2.LogLinkRequest(seq=1))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason_of(err.value) == "TOKEN_SIGNATURE"
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.RevokeToken(
                admin_pb2.RevokeTokenRequest(token_id="x"), metadata=(("authorization", f"Bearer {client}"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        messaging = messaging_pb2_grpc.MessagingServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await messaging.GetCommitOffset(
                messaging_pb2.GetCommitOffsetRequest(), metadata=(("authorization", f"Bearer {service}"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A service token does get through to internal RPCs (an empty frame is refused by itself).
        call = internal.LogLink(metadata=(("authorization", f"Bearer {service}"),), timeout=5)
        await call.write(internal_pb2.LogLinkRequest(seq=1))
        answer = await call.read()
        assert answer.seq == 1 and answer.error.reason == "FRAME_EMPTY"
        call.cancel()


async def test_graceful_shutdown_goes_not_serving(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path, ["sync"]) as suite:
        service = suite.services["sync"]
        async with suite.channel("sync") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await service.health.enter_graceful_shutdown()
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()


async def test_services_export_their_spans_over_otlp(backend: Backend, tmp_path: Path) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone makes a service export its RPC and database spans, under its name."""
    from opentelemetry.trace import SpanKind

    from tests.otlp import OtlpReceiver

    receiver = OtlpReceiver()
    endpoint = await receiver.start()
    try:
        async with running_suite(
            backend, tmp_path, ["messaging"], OTEL_EXPORTER_OTLP_ENDPOINT=endpoint
        ) as suite:
            token = suite.token("alice@example.com", "phone")
            await _call_unary(suite, (("authorization", f"Bearer {token}"),))
            service = suite.services["messaging"]
            assert await service.runtime.healthy()  # a database round trip, traced
            await asyncio.to_thread(service.runtime.telemetry.force_flush)
            spans = await receiver.wait_for(
                lambda s: (
                    s.kind == SpanKind.SERVER
                    and s.name == "/bimip.messaging.v1.MessagingService/GetCommitOffset"
                )
            )
            assert spans[0].service_name == "messaging"
            db = await receiver.wait_for(lambda s: s.attributes.get("db.system") is not None)
            assert db[0].service_name == "messaging"
    finally:
        await receiver.stop()

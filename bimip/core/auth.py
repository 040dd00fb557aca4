"""Authentication (SPEC X2).

Client calls carry ``authorization: Bearer <JWT>`` naming the user (``sub``, an eid) and the device
(``device``), with ``exp`` and a token id (``jti``). HS256 with a shared secret is for development,
RS256 with a public key for production; ``alg: none`` and any algorithm but the configured one are
refused by construction (PyJWT is given exactly one algorithm).

Calls between services carry a service token: a JWT signed with a separate internal secret, with
audience ``bimip-internal``. A client token can never stand in for it (other key, other audience),
and internal RPCs refuse client tokens.

Revocation is by token id, kept in Redis (shared by replicas) or in process (embedded default). A
sweeper closes already-open streams whose token expired or was revoked within one heartbeat
interval.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import grpc
import jwt

from bimip.core.clock import Clock
from bimip.core.config import ConfigError, CoreSettings
from bimip.core.errors import BimipError, unauthenticated, unimplemented
from bimip.core.ids import device_id_problem, eid_problem

log = logging.getLogger(__name__)

INTERNAL_AUDIENCE = "bimip-internal"
DEVICE_CLAIM = "device"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user's device (kind "client") or another service (kind "service")."""

    kind: str
    eid: str
    device_id: str
    token_id: str
    expires_at: float  # Unix seconds


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("bimip_principal")


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled (set by the auth interceptor)."""
    return _current.get()


# --- keys -------------------------------------------------------------------------------------


def _secret_file(var_dir: str, name: str) -> str:
    """A random development secret kept in VAR_DIR, created on first use, readable by the owner only."""
    path = Path(var_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = path.open("x", encoding="utf-8")
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    with fd:
        path.chmod(0o600)
        value = secrets.token_urlsafe(32)
        fd.write(value)
    return value


def _pem(value: str) -> str:
    return value if "-----BEGIN" in value else Path(value).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Keys:
    algorithm: str
    verify_key: Any
    sign_key: Any | None
    internal_secret: str
    issuer: str
    audience: str

    @classmethod
    def from_settings(cls, settings: CoreSettings) -> Keys:
        internal = settings.internal_secret or _secret_file(settings.var_dir, "internal-secret")
        if settings.jwt_algorithm == "HS256":
            secret = settings.jwt_secret or _secret_file(settings.var_dir, "jwt-secret")
            return cls("HS256", secret, secret, internal, settings.jwt_issuer, settings.jwt_audience)
        if not settings.jwt_public_key:
            raise ConfigError("BIMIP_JWT_PUBLIC_KEY: required when BIMIP_JWT_ALGORITHM=RS256")
        private = _pem(settings.jwt_private_key) if settings.jwt_private_key else None
        return cls(
            "RS256",
            _pem(settings.jwt_public_key),
            private,
            internal,
            settings.jwt_issuer,
            settings.jwt_audience,
        )


# --- tokens -----------------------------------------------------------------------------------


def _encode(
    key: Any,
    algorithm: str,
    *,
    issuer: str,
    audience: str,
    subject: str,
    ttl: timedelta,
    now: float,
    **extra: str,
) -> str:
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": int(now),
        "exp": int(now + ttl.total_seconds()),
        "jti": uuid.uuid4().hex,
        **extra,
    }
    return jwt.encode(claims, key, algorithm=algorithm)


def issue_client_token(
    keys: Keys, eid: str, device_id: str, ttl: timedelta, *, now: float | None = None
) -> str:
    if keys.sign_key is None:
        raise ValueError("no signing key: set BIMIP_JWT_PRIVATE_KEY to issue RS256 tokens")
    return _encode(
        keys.sign_key,
        keys.algorithm,
        issuer=keys.issuer,
        audience=keys.audience,
        subject=eid,
        ttl=ttl,
        now=time.time() if now is None else now,
        **{DEVICE_CLAIM: device_id},
    )


def issue_service_token(keys: Keys, service: str, ttl: timedelta = timedelta(hours=1)) -> str:
    return _encode(
        keys.internal_secret,
        "HS256",
        issuer=keys.issuer,
        audience=INTERNAL_AUDIENCE,
        subject=f"service:{service}",
        ttl=ttl,
        now=time.time(),
    )


class ServiceCredentials:
    """Metadata for calls from one service to another; the token is renewed before it expires."""

    def __init__(self, keys: Keys, service: str) -> None:
        self._keys = keys
        self._service = service
        self._token = ""
        self._renew_at = 0.0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        now = time.time()
        if now >= self._renew_at:
            self._token = issue_service_token(self._keys, self._service)
            self._renew_at = now + 1800
        return (("authorization", f"Bearer {self._token}"),)


def verify_token(keys: Keys, token: str, *, internal: bool, leeway: float = 5.0) -> Principal:
    """Decode and check a bearer token; raise BimipError(UNAUTHENTICATED) with a precise reason."""
    key, algorithm, audience = (
        (keys.internal_secret, "HS256", INTERNAL_AUDIENCE)
        if internal
        else (keys.verify_key, keys.algorithm, keys.audience)
    )
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=keys.issuer,
            leeway=leeway,
            options={"require": ["exp", "sub", "jti", "aud", "iss"]},
        )
    except jwt.ExpiredSignatureError:
        raise unauthenticated("TOKEN_EXPIRED", "the token has expired") from None
    except jwt.InvalidAlgorithmError:
        raise unauthenticated("TOKEN_ALGORITHM", f"tokens must be signed with {algorithm}") from None
    except jwt.InvalidAudienceError:
        what = "service" if internal else "client"
        raise unauthenticated("TOKEN_AUDIENCE", f"not a {what} token for this audience") from None
    except jwt.InvalidSignatureError:
        raise unauthenticated("TOKEN_SIGNATURE", "the token's signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise unauthenticated("TOKEN_CLAIMS", f"the token lacks the {exc.claim!r} claim") from None
    except jwt.PyJWTError as exc:
        raise unauthenticated("TOKEN_INVALID", f"the token is malformed or invalid: {exc}") from None
    sub, jti = str(claims["sub"]), str(claims["jti"])
    if internal:
        return Principal("service", sub, "", jti, float(claims["exp"]))
    device = claims.get(DEVICE_CLAIM)
    if not isinstance(device, str) or not device:
        raise unauthenticated("TOKEN_CLAIMS", f"the token lacks the {DEVICE_CLAIM!r} claim")
    if problem := eid_problem(sub):
        raise unauthenticated("TOKEN_CLAIMS", f"the token's user (sub) {problem}")
    if problem := device_id_problem(device):
        raise unauthenticated("TOKEN_CLAIMS", f"the token's device {problem}")
    return Principal("client", sub, device, jti, float(claims["exp"]))


# --- revocation -------------------------------------------------------------------------------


class Revocations(Protocol):
    async def revoke(self, token_id: str, until: float) -> None:
        """Refuse the token id until `until` (Unix seconds, normally the token's expiry)."""
        ...

    async def revoked(self, token_ids: Iterable[str]) -> set[str]:
        """Which of these token ids are revoked (one round trip for all)."""
        ...


class InProcessRevocations:
    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    async def revoke(self, token_id: str, until: float) -> None:
        self._until[token_id] = until

    async def revoked(self, token_ids: Iterable[str]) -> set[str]:
        now = time.time()
        for jti in [j for j, u in self._until.items() if u < now]:
            del self._until[jti]
        return {j for j in token_ids if j in self._until}


class RedisRevocations:
    """Revoked token ids as Redis keys that expire with the token, shared by every replica."""

    def __init__(self, client: Any, namespace: str) -> None:
        self._redis = client
        self._prefix = f"{namespace}:revoked:"

    async def revoke(self, token_id: str, until: float) -> None:
        ttl = max(1, int(until - time.time()) + 60)
        await self._redis.set(self._prefix + token_id, b"1", ex=ttl)

    async def revoked(self, token_ids: Iterable[str]) -> set[str]:
        ids = list(token_ids)
        if not ids:
            return set()
        values = await self._redis.mget([self._prefix + j for j in ids])
        return {j for j, v in zip(ids, values, strict=True) if v is not None}


# --- the interceptor --------------------------------------------------------------------------


@dataclass(eq=False)
class _OpenStream:
    principal: Principal
    task: asyncio.Task[Any]
    closed_reason: BimipError | None = None


@dataclass
class AuthPolicy:
    """Which methods need no token (health, reflection) and which are internal-only."""

    public_prefixes: tuple[str, ...] = (
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1alpha.ServerReflection/",
        "/grpc.reflection.v1.ServerReflection/",
    )
    internal_services: frozenset[str] = field(
        default_factory=lambda: frozenset(
            {"bimip.messaging.v1.MessagingInternalService", "bimip.admin.v1.AdminService"}
        )
    )

    def kind(self, method: str) -> str:
        if method.startswith(self.public_prefixes):
            return "public"
        service = method.lstrip("/").split("/", 1)[0]
        return "internal" if service in self.internal_services else "client"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Deny by default: every method but health and reflection needs a valid, unrevoked token.

    The check runs inside the handler's own task (the handler is wrapped), so the principal is
    visible to the servicer through a context variable and refusals carry an ErrorInfo reason.
    """

    def __init__(
        self,
        keys: Keys,
        revocations: Revocations,
        clock: Clock,
        *,
        sweep_interval: float,
        policy: AuthPolicy | None = None,
    ) -> None:
        self._keys = keys
        self._revocations = revocations
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._policy = policy or AuthPolicy()
        self._streams: set[_OpenStream] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="auth-sweeper")

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def authenticate(self, context: grpc.aio.ServicerContext[Any, Any], internal: bool) -> Principal:
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if not values:
            raise unauthenticated(
                "TOKEN_MISSING", "no authorization metadata: send 'authorization: Bearer <token>'"
            )
        header = values[0] if isinstance(values[0], str) else values[0].decode()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("TOKEN_MISSING", "the authorization metadata must be 'Bearer <token>'")
        principal = verify_token(self._keys, token.strip(), internal=internal)
        if principal.token_id in await self._revocations.revoked([principal.token_id]):
            raise unauthenticated("TOKEN_REVOKED", "the token has been revoked")
        return principal

    async def _sweep_forever(self) -> None:
        while True:
            await self._clock.sleep(self._sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("token sweep failed")

    async def sweep(self) -> None:
        """Close streams whose token expired or was revoked (one revocation look-up for all)."""
        if not self._streams:
            return
        now = self._clock.now().timestamp()
        streams = list(self._streams)
        revoked = await self._revocations.revoked({s.principal.token_id for s in streams})
        for stream in streams:
            if stream.principal.token_id in revoked:
                reason = unauthenticated("TOKEN_REVOKED", "the token has been revoked")
            elif stream.principal.expires_at <= now:
                reason = unauthenticated("TOKEN_EXPIRED", "the token has expired")
            else:
                continue
            if stream.closed_reason is None:
                stream.closed_reason = reason
                stream.task.cancel()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        kind = self._policy.kind(handler_call_details.method)
        if handler is None or kind == "public":
            return handler
        return self._wrap(handler, handler_call_details.method, internal=kind == "internal")

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, *, internal: bool
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # Generated base servicers raise NotImplementedError for RPCs a service does not serve yet;
        # they answer UNIMPLEMENTED with a reason like every other refusal.
        streaming_response = handler.response_streaming

        async def enter(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            try:
                principal = await self.authenticate(context, internal)
            except BimipError as err:
                await err.abort(context)
            _current.set(principal)
            return principal

        if not streaming_response:
            # The stubs describe sync handlers; on a grpc.aio server they are coroutines.
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await enter(context)
                try:
                    return await inner(request, context)
                except NotImplementedError:
                    await unimplemented(method).abort(context)

            factory: Any = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            wrapped: grpc.RpcMethodHandler[Any, Any] = factory(
                unary, handler.request_deserializer, handler.response_serializer
            )
            return wrapped

        # Streaming servicer methods are async generators (the house style).
        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            principal = await enter(context)
            task = asyncio.current_task()
            assert task is not None
            entry = _OpenStream(principal, task)
            self._streams.add(entry)
            try:
                async for item in inner_stream(request, context):
                    yield item
            except NotImplementedError:
                await unimplemented(method).abort(context)
            except asyncio.CancelledError:
                if entry.closed_reason is None:
                    raise
                task.uncancel()
                await entry.closed_reason.abort(context)
            finally:
                self._streams.discard(entry)

        stream_factory: Any = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        wrapped_stream: grpc.RpcMethodHandler[Any, Any] = stream_factory(
            stream, handler.request_deserializer, handler.response_serializer
        )
        return wrapped_stream

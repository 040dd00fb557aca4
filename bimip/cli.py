"""The `bimip` command: run the services, issue and revoke tokens, migrate, list settings."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from bimip.core.config import (
    ConfigError,
    CoreSettings,
    check_unknown_variables,
    load_settings,
    settings_table,
)

SERVICES = ("messaging", "awareness", "sync")
log = logging.getLogger("bimip")


def _settings_classes() -> dict[str, type[CoreSettings]]:
    from services.awareness.config import AwarenessSettings
    from services.messaging.config import MessagingSettings
    from services.sync.config import SyncSettings

    return {"messaging": MessagingSettings, "awareness": AwarenessSettings, "sync": SyncSettings}


def _factories() -> dict[str, object]:
    from services.awareness.app import build as awareness
    from services.messaging.app import build as messaging
    from services.sync.app import build as sync

    return {"messaging": messaging, "awareness": awareness, "sync": sync}


def _parse_duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 24h, 7d)") from None


GC_THRESHOLD = (50_000, 20, 100)
"""The cyclic collector's thresholds while serving. Every frame allocates several objects (frames,
futures, handles), so the default first generation of 700 ran a collection every few frames: 10 %
of an awareness replica's CPU in a fan-out (BENCHMARKS.md). Reference counting frees almost all of
it; the collector is left for true cycles."""


def tune_gc() -> None:
    """Move what startup built (modules, settings, the servers) out of the collector's sight and
    collect less often; see GC_THRESHOLD."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def _run(names: Sequence[str]) -> int:
    from bimip.core.logging import configure_logging
    from bimip.core.server import RunningService, Shared, start_service

    classes = _settings_classes()
    check_unknown_variables(classes.values())
    core = load_settings(CoreSettings)
    configure_logging("bimip" if len(names) > 1 else names[0], core.log_level)
    shared = Shared(core)
    factories = _factories()
    running: list[RunningService] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for name in names:
            settings = load_settings(classes[name])
            running.append(await start_service(name, factories[name], shared, settings))  # type: ignore[arg-type]
        tune_gc()
        for service in running:
            print(f"{service.name:<10} listening on {core.host}:{service.port}", flush=True)
        print(f"{'metrics':<10} on http://{core.host}:{shared.metrics_port}/metrics", flush=True)
        print("BIMIP is running; Ctrl-C stops it gracefully.", flush=True)
        await stop.wait()
        print("shutting down…", flush=True)
    finally:
        await asyncio.gather(*(service.stop() for service in reversed(running)), return_exceptions=True)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    names = args.services or list(SERVICES)
    if unknown := [n for n in names if n not in SERVICES]:
        raise ConfigError(f"no service named {unknown[0]!r}; choose from {', '.join(SERVICES)}")
    return asyncio.run(_run(names))


def _cmd_token_issue(args: argparse.Namespace) -> int:
    from bimip.core.auth import Keys, issue_client_token
    from bimip.core.ids import device_id_problem, eid_problem

    if problem := eid_problem(args.user):
        raise ConfigError(f"--user: {args.user!r} {problem}")
    if problem := device_id_problem(args.device):
        raise ConfigError(f"--device: {args.device!r} {problem}")
    keys = Keys.from_settings(load_settings(CoreSettings))
    print(issue_client_token(keys, args.user, args.device, args.ttl))
    return 0


async def _revoke(address: str, token_id: str, until: int) -> None:
    import grpc

    from bimip.admin.v1 import admin_pb2, admin_pb2_grpc
    from bimip.core.auth import Keys, ServiceCredentials

    keys = Keys.from_settings(load_settings(CoreSettings))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        await stub.RevokeToken(
            admin_pb2.RevokeTokenRequest(token_id=token_id, until_unix=until),
            metadata=ServiceCredentials(keys, "cli").metadata(),
            timeout=10,
        )


def _cmd_token_revoke(args: argparse.Namespace) -> int:
    import jwt

    token_id, until = args.id, 0
    if args.token:
        claims = jwt.decode(args.token, options={"verify_signature": False})
        token_id, until = str(claims["jti"]), int(claims.get("exp", 0))
    if not token_id:
        raise ConfigError("--id or --token: say which token to revoke")
    asyncio.run(_revoke(args.address, token_id, until))
    print(f"revoked {token_id}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from bimip.chat.app import run
    from bimip.core.auth import Keys, issue_client_token
    from bimip.core.ids import device_id_problem, eid_problem
    from bimip.sdk import Client

    core = load_settings(CoreSettings)
    if args.token:
        token = args.token
    else:  # a development token, signed with this machine's settings (the embedded default's)
        if problem := eid_problem(args.user):
            raise ConfigError(f"--user: {args.user!r} {problem}")
        if problem := device_id_problem(args.device):
            raise ConfigError(f"--device: {args.device!r} {problem}")
        token = issue_client_token(Keys.from_settings(core), args.user, args.device, timedelta(hours=24))
    if args.peer and (problem := eid_problem(args.peer)):
        raise ConfigError(f"--with: {args.peer!r} {problem}")
    host = "127.0.0.1" if core.host in ("0.0.0.0", "::", "") else core.host
    store = Path(args.store or Path(core.var_dir) / "chat" / f"{args.user}-{args.device}.db")
    store.parent.mkdir(parents=True, exist_ok=True)
    client = Client(
        token,
        store=store,
        messaging=args.messaging or f"{host}:{core.messaging_port}",
        awareness=args.awareness or f"{host}:{core.awareness_port}",
        sync=args.sync or f"{host}:{core.sync_port}",
    )
    if (client.eid, client.device_id) != (args.user, args.device):
        raise ConfigError(f"--token names {client.eid}/{client.device_id}, not {args.user}/{args.device}")
    return run(client, args.peer)


async def _health(address: str, service: str, deadline_s: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types describe the sync API
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=deadline_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def _cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service answers SERVING (for container health checks)."""
    import grpc

    try:
        status = asyncio.run(_health(args.address, args.service, args.timeout))
    except grpc.aio.AioRpcError as err:
        print(f"{args.address}: {err.code().name} {err.details() or ''}".rstrip(), file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


def _cmd_migrate(args: argparse.Namespace) -> int:
    from bimip.core.storage import current_revision, migrate

    settings = load_settings(CoreSettings)
    asyncio.run(migrate(settings.database_url, args.revision))
    print(f"database at revision {asyncio.run(current_revision(settings.database_url))}")
    return 0


def _cmd_settings(args: argparse.Namespace) -> int:
    classes = _settings_classes()
    if args.json:
        print(json.dumps({name: cls.model_json_schema() for name, cls in classes.items()}, indent=2))
    else:
        print(settings_table([CoreSettings, *classes.values()]))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bimip", description="BIMIP: messaging, awareness and sync services")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start services (all three in one process by default)")
    run.add_argument("services", nargs="*", metavar="SERVICE", help="any of: " + ", ".join(SERVICES))
    run.set_defaults(func=_cmd_run)

    token = sub.add_parser("token", help="development tokens")
    tsub = token.add_subparsers(dest="token_command", required=True)
    issue = tsub.add_parser("issue", help="print a client token for a user's device")
    issue.add_argument("--user", required=True, help="the user's eid, e.g. alice@example.com")
    issue.add_argument("--device", required=True, help="the device id, e.g. laptop")
    issue.add_argument(
        "--ttl", type=_parse_duration, default=timedelta(hours=24), help="lifetime (default 24h)"
    )
    issue.set_defaults(func=_cmd_token_issue)
    revoke = tsub.add_parser("revoke", help="revoke a client token on a running service")
    revoke.add_argument("--id", default="", help="the token's jti")
    revoke.add_argument("--token", default="", help="the token itself (its jti and expiry are read from it)")
    revoke.add_argument("--address", default="127.0.0.1:50051", help="a running service (host:port)")
    revoke.set_defaults(func=_cmd_token_revoke)

    chat = sub.add_parser("chat", help="a terminal chat on the Python SDK, against running services")
    chat.add_argument("--user", required=True, help="your eid, e.g. alice@example.com")
    chat.add_argument("--device", required=True, help="this device's id, e.g. laptop")
    chat.add_argument("--with", dest="peer", default=None, help="open the conversation with this eid")
    chat.add_argument("--token", default="", help="a client token (default: a development token)")
    chat.add_argument("--store", default="", help="the device's SQLite store (default VAR_DIR/chat/…)")
    chat.add_argument("--messaging", default="", help="host:port (default: this machine's settings)")
    chat.add_argument("--awareness", default="", help="host:port")
    chat.add_argument("--sync", default="", help="host:port")
    chat.set_defaults(func=_cmd_chat)

    hc = sub.add_parser("health", help="ask a running service's gRPC health check (exit 0 when SERVING)")
    hc.add_argument("--address", default="127.0.0.1:50051", help="host:port (default 127.0.0.1:50051)")
    hc.add_argument("--service", default="", help="a service name (default: the whole server)")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    hc.set_defaults(func=_cmd_health)

    mig = sub.add_parser("migrate", help="apply database migrations (production start-up step)")
    mig.add_argument("--revision", default="head", help="revision to upgrade to (default head)")
    mig.set_defaults(func=_cmd_migrate)

    st = sub.add_parser("settings", help="list every setting with its default")
    st.add_argument("--json", action="store_true", help="as JSON schema")
    st.set_defaults(func=_cmd_settings)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"bimip: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

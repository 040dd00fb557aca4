"""Prometheus metrics of the services of one process, and the HTTP endpoint that serves them.

Every `Shared` (one per process, or per test suite) owns one `Metrics`, on a `CollectorRegistry` of
its own: prometheus_client's global registry is never used, so services started side by side in one
process (tests, `bimip run`) count into their own process's numbers only. The services receive it
through their `Runtime` and bind the labelled series they use when they are built.

Labels are low-cardinality by design: a service, a stream kind, a path, an event kind or an error
reason; never a user, a device, an id or a payload. Counting is cheap: once per request, per
committed batch or per page of entries, never a loop added for counting.

`MetricsServer` serves the Prometheus text format (or OpenMetrics, if asked for) at ``/metrics`` on
the event loop with asyncio streams; the exposition is rendered in a worker thread, so a scrape
never holds up the loop, and stopping is immediate (no thread to poll for shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

LAG_BUCKETS = (0, 1, 10, 100, 1_000, 10_000, 100_000)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000)


class Metrics:
    """Every metric of BIMIP, created against one registry (one per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry

        self.open_streams = Gauge(
            "bimip_open_streams",
            "Streams open now, by service and kind (messaging: connect, log_link; "
            "awareness: connect; sync: hello, stream_delta)",
            ["service", "kind"],
            registry=r,
        )

        # --- messaging ---
        self.sent_messages = Counter(
            "bimip_messaging_sent_messages_total",
            "Messages accepted and persisted (idempotent retries excluded), by how they came: "
            "stream (Connect), unary (SendMessage) or sync (offline messages of a hello, via LogLink)",
            ["via"],
            registry=r,
        )
        self.duplicate_sends = Counter(
            "bimip_messaging_duplicate_sends_total",
            "Sends answered with an earlier send's ack (same client_id within the dedupe window, M3)",
            registry=r,
        )
        self.send_refusals = Counter(
            "bimip_messaging_send_refusals_total",
            "Sends refused, by the error reason the sender gets (e.g. RATE_LIMITED, BLOCKED)",
            ["reason"],
            registry=r,
        )
        self.delivered_entries = Counter(
            "bimip_messaging_delivered_entries_total",
            "Log entries written to device Connect streams: first deliveries, redeliveries and replays",
            registry=r,
        )
        self.redelivered_entries = Counter(
            "bimip_messaging_redelivered_entries_total",
            "Entries sent to a device again, unacknowledged after the grace period (M6) or on a flush (M11)",
            registry=r,
        )
        self.acks = Counter(
            "bimip_messaging_acks_total",
            "Acknowledgements that moved a device cursor, by how they came: stream (Connect acks, "
            "those that queue up while one is written count once) or sync (hello acks, via LogLink)",
            ["via"],
            registry=r,
        )
        self.acked_entries = Counter(
            "bimip_messaging_acked_entries_total",
            "Log offsets device cursors moved forward on acknowledgements, by how they came (stream, sync)",
            ["via"],
            registry=r,
        )
        self.device_lag = Histogram(
            "bimip_messaging_device_lag_entries",
            "Entries a device's cursor is behind its user's log head, observed on each acknowledgement "
            "that moves it (the head as this replica knows it, minus the cursor after the ack); "
            "a device that never acknowledges is not observed",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "bimip_messaging_commit_seconds",
            "Duration of one transaction of the messaging writer (a group commit of queued writes)",
            registry=r,
        )
        self.commit_batch_size = Histogram(
            "bimip_messaging_commit_batch_size",
            "Writes (sends, acks, marks, commands, ...) per transaction of the messaging writer",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

        # --- awareness ---
        self.awareness_published = Counter(
            "bimip_awareness_published_events_total",
            "Events awareness published on the bus, by kind: presence (a user's visible presence "
            "changed), intent, visibility, activity (typing, recording, paused), subscription",
            ["kind"],
            registry=r,
        )
        self.awareness_delivered = Counter(
            "bimip_awareness_delivered_events_total",
            "Events written to awareness streams of this process, by kind (as published)",
            ["kind"],
            registry=r,
        )

        # --- sync ---
        self.sync_requests = Counter(
            "bimip_sync_requests_total",
            "Catch-up requests to sync, by kind: delta (GetDelta), stream_delta, snapshot, resume, hello",
            ["kind"],
            registry=r,
        )
        self.sync_entries = Counter(
            "bimip_sync_entries_total",
            "Log entries sync served, by kind: delta, stream_delta, hello (pages after the uploads), "
            "resume (entries of the repaired ranges)",
            ["kind"],
            registry=r,
        )


READ_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 16 * 1024


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 (one request per connection), on the running event loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on `host`:`port` (0 = any free port); raises OSError if it cannot."""
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST_BYTES)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request, *lines = head.split("\r\n")
            method, target, _ = request.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            status, content_type, body = "200 OK", "text/plain; charset=utf-8", b""
            if target.split("?", 1)[0] != "/metrics":
                status, body = "404 Not Found", b"metrics are at /metrics\n"
            elif method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b"GET /metrics\n"
            else:
                encoder, content_type = choose_encoder(headers.get("accept", ""))
                body = await asyncio.to_thread(encoder, self.registry)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (
            TimeoutError,
            ValueError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a client that sent no complete request, or left: nothing to answer
        except Exception:
            log.warning("metrics: a scrape failed", exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._clients.discard(task)

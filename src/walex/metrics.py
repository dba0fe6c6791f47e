"""Prometheus metrics and a health check for walex (``pip install "walex[metrics]"``).

A :class:`Metrics` object counts what an app does (it is the app's
*observer*: the app calls :meth:`Metrics.on_batch` and
:meth:`Metrics.on_handler`) and reads the state of the streams it tracks
(:meth:`Metrics.track_stream`) each time it is scraped, so the positions and
the lag are always current and cost nothing between scrapes.

:meth:`Metrics.serve` answers ``GET /metrics`` (the Prometheus text format)
and ``GET /healthz``: 200 while every tracked stream is connected and its lag
is under ``max_lag_bytes``, 503 with the reason otherwise.

Example::

    metrics = walex.metrics.Metrics(max_lag_bytes=256 * 1024**2)
    server = await metrics.serve("0.0.0.0", 9187)
    async with walex.connect(dsn, publication="events", slot="orders",
                             durable=True) as stream:
        metrics.track_stream(stream)
        async for batch in stream:
            started = time.perf_counter()
            handle(batch)
            metrics.on_batch(batch, time.perf_counter() - started)

Metrics (``walex_`` prefix by default):

=====================================  ===========================================
``events_total{table,type}``           events handed on, by ``schema.table`` and type
``batches_total``                      batches handed on
``batch_duration_seconds``             time to handle one batch (histogram)
``handler_duration_seconds{handler}``  time in each handler (histogram)
``handler_errors_total{handler,...}``  handler calls that raised
``confirmed_lsn{slot}``                the position confirmed to the server
``server_wal_end_lsn{slot}``           the server's WAL end, as last reported
``received_lsn{slot}``                 the newest position received
``lag_bytes{slot}``                    server WAL end - confirmed position
``reconnects_total{slot}``             replication connections re-established
``connected{slot}``                    1 while the replication connection is up
=====================================  ===========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections import Counter as _Tally
from collections.abc import Iterable

from .errors import ConfigurationError
from .events import Batch
from .stream import Stream

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client import Counter as _Counter
    from prometheus_client import Histogram as _Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        'walex.metrics needs prometheus-client: pip install "walex[metrics]"',
        name="prometheus_client",
    ) from exc

__all__ = ["Metrics", "lag_bytes"]

logger = logging.getLogger(__name__)

_HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_READ_TIMEOUT = 10.0  # seconds a client may take to send its request
_MAX_REQUEST = 16 * 1024


class _StreamCollector(Collector):
    """Reads the tracked streams' positions when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics()
        streams = metrics.streams if metrics is not None else []
        prefix = metrics.namespace if metrics is not None else "walex"
        confirmed = GaugeMetricFamily(
            f"{prefix}_confirmed_lsn",
            "The WAL position confirmed to the server as handled.",
            labels=["slot"],
        )
        wal_end = GaugeMetricFamily(
            f"{prefix}_server_wal_end_lsn",
            "The server's WAL end, as of its last message.",
            labels=["slot"],
        )
        received = GaugeMetricFamily(
            f"{prefix}_received_lsn", "The newest WAL position received.", labels=["slot"]
        )
        lag = GaugeMetricFamily(
            f"{prefix}_lag_bytes",
            "WAL between the server's end and the confirmed position.",
            labels=["slot"],
        )
        reconnects = CounterMetricFamily(
            f"{prefix}_reconnects",
            "Replication connections re-established after a loss.",
            labels=["slot"],
        )
        connected = GaugeMetricFamily(
            f"{prefix}_connected",
            "1 while the replication connection is up.",
            labels=["slot"],
        )
        for stream in streams:
            labels = [stream.slot]
            confirmed.add_metric(labels, float(stream.confirmed_lsn))
            wal_end.add_metric(labels, float(stream.server_wal_end))
            received.add_metric(labels, float(stream.received_lsn))
            lag.add_metric(labels, float(lag_bytes(stream)))
            reconnects.add_metric(labels, float(stream.reconnects))
            connected.add_metric(labels, 1.0 if stream.connected else 0.0)
        yield from (confirmed, wal_end, received, lag, reconnects, connected)


def lag_bytes(stream: Stream) -> int:
    """How far *stream* is behind: server WAL end - confirmed position, never negative.

    0 until the server has reported its WAL end.
    """
    end = int(stream.server_wal_end)
    if not end:
        return 0
    return max(0, end - int(stream.confirmed_lsn))


class Metrics:
    """Prometheus metrics and a health check for walex streams and apps.

    Args:
        registry: where the metrics live; a new registry of its own when
            ``None`` (pass ``prometheus_client.REGISTRY`` to share the
            process's default registry, with its process metrics).
        namespace: the prefix of every metric name.
        max_lag_bytes: ``/healthz`` fails while a stream's lag exceeds this;
            ``None`` checks only that streams are connected.

    Raises:
        ConfigurationError: ``max_lag_bytes`` is negative.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "walex",
        max_lag_bytes: int | None = None,
    ) -> None:
        if max_lag_bytes is not None and max_lag_bytes < 0:
            raise ConfigurationError("max_lag_bytes must be a number of bytes, 0 or more")
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.namespace = namespace
        self.max_lag_bytes = max_lag_bytes
        self.streams: list[Stream] = []
        self.events = _Counter(
            "events",
            "Events handed on, by table and type.",
            ["table", "type"],
            namespace=namespace,
            registry=self.registry,
        )
        self.batches = _Counter(
            "batches", "Batches handed on.", namespace=namespace, registry=self.registry
        )
        self.batch_seconds = _Histogram(
            "batch_duration_seconds",
            "Time to handle one batch.",
            namespace=namespace,
            registry=self.registry,
            buckets=_HANDLER_BUCKETS,
        )
        self.handler_seconds = _Histogram(
            "handler_duration_seconds",
            "Time spent in each handler call.",
            ["handler"],
            namespace=namespace,
            registry=self.registry,
            buckets=_HANDLER_BUCKETS,
        )
        self.errors = _Counter(
            "handler_errors",
            "Handler calls that raised, by handler, table and event type.",
            ["handler", "table", "type"],
            namespace=namespace,
            registry=self.registry,
        )
        self.registry.register(_StreamCollector(self))

    # -- what the app reports ------------------------------------------------

    def on_batch(self, batch: Batch, seconds: float) -> None:
        """Count a handled batch and its events.

        Args:
            batch: the batch.
            seconds: how long handling it took.
        """
        tally: _Tally[tuple[str, str]] = _Tally()
        for event in batch.events:
            source = event.source
            tally[(source.name if source is not None else "", event.type)] += 1
        for (table, kind), count in tally.items():
            self.events.labels(table, kind).inc(count)
        self.batches.inc()
        self.batch_seconds.observe(seconds)

    def on_handler(
        self,
        handler_name: str,
        table: str | None,
        event_type: str,
        seconds: float,
        error: BaseException | None,
    ) -> None:
        """Record one handler call.

        Args:
            handler_name: the handler (its qualified name, say).
            table: ``schema.table`` (``None`` for messages).
            event_type: ``"insert"``, ``"update"``...
            seconds: how long the call took.
            error: what it raised, or ``None``.
        """
        self.handler_seconds.labels(handler_name).observe(seconds)
        if error is not None:
            self.errors.labels(handler_name, table or "", event_type).inc()

    def track_stream(self, stream: Stream) -> None:
        """Report *stream*'s positions, lag, reconnects and connection state."""
        if stream not in self.streams:
            self.streams.append(stream)

    def untrack_stream(self, stream: Stream) -> None:
        """Stop reporting *stream*."""
        with contextlib.suppress(ValueError):
            self.streams.remove(stream)

    # -- reading -------------------------------------------------------------

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def health(self) -> tuple[bool, list[str]]:
        """Whether every tracked stream is connected and within the lag limit.

        Returns:
            ``(healthy, problems)``; unhealthy with no stream tracked (the
            stream is not up yet, or waits as a standby).
        """
        problems: list[str] = []
        if not self.streams:
            problems.append("no stream is running")
        for stream in self.streams:
            if not stream.connected:
                problems.append(f"slot {stream.slot}: not connected")
                continue
            lag = lag_bytes(stream)
            if self.max_lag_bytes is not None and lag > self.max_lag_bytes:
                problems.append(
                    f"slot {stream.slot}: lag {lag} bytes is over the limit of {self.max_lag_bytes}"
                )
        return not problems, problems

    # -- serving -------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 9187) -> asyncio.Server:
        """Serve ``/metrics`` and ``/healthz`` over HTTP on the running loop.

        Args:
            host: the address to listen on (``"0.0.0.0"`` for every interface).
            port: the TCP port; 0 picks a free one (see the returned server's
                ``sockets[0].getsockname()``).

        Returns:
            The listening server; ``server.close()`` then
            ``await server.wait_closed()`` stops it.
        """
        server = await asyncio.start_server(self._client, host, port)
        bound = ", ".join(str(s.getsockname()[:2]) for s in server.sockets)
        logger.info("metrics on http://%s/metrics, health on /healthz", bound)
        return server

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            if len(head) > _MAX_REQUEST:
                await _respond(writer, 431, b"request header too large\n")
                return
            method, target = _request_line(head)
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"method not allowed\n", head_only=False)
                return
            head_only = method == "HEAD"
            if path == "/metrics":
                body = self.exposition()
                await _respond(writer, 200, body, CONTENT_TYPE_LATEST, head_only=head_only)
            elif path in ("/healthz", "/health"):
                healthy, problems = self.health()
                doc = {"status": "ok" if healthy else "unhealthy", "problems": problems}
                await _respond(
                    writer,
                    200 if healthy else 503,
                    json.dumps(doc).encode() + b"\n",
                    "application/json",
                    head_only=head_only,
                )
            else:
                await _respond(writer, 404, b"not found: try /metrics or /healthz\n")
        except (ConnectionError, OSError) as exc:
            logger.debug("metrics client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def _request_line(head: bytes) -> tuple[str, str]:
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = first.split()
    if len(parts) < 2:
        return "", ""
    return parts[0], parts[1]


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
) -> None:
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()

"""Prometheus metrics and a health check for walex (``pip install "walex[metrics]"``).

This module owns observing an app: it counts what the app reports, reads the
tracked streams' positions, and answers ``/metrics`` and ``/healthz``. It
must not change a stream or the app (it only reads them), nor import the app
or anything above it: of walex it imports only errors, events and stream.

A :class:`Metrics` object counts what an app does (it is the app's
*observer*: the app calls :meth:`Metrics.on_batch` and
:meth:`Metrics.on_handler`) and reads the state of the streams it tracks
(:meth:`Metrics.track_stream`) each time it is scraped, so the positions and
the lag are always current and cost nothing between scrapes.

:meth:`Metrics.serve` answers ``GET /metrics`` (the Prometheus exposition,
by ``prometheus_client.make_wsgi_app``) and ``GET /healthz``: 200 while every
tracked stream is connected and its lag is under ``max_lag_bytes``, 503 with
the reason otherwise. The server is the standard library's
``wsgiref.simple_server`` with a thread per request, on a thread of its own,
so answering and encoding a scrape stay off the event loop; only the
streams' state is read on their loop, where the streams change.

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
``lag_seconds{slot}``                  while behind: now - commit time of the newest handled
``silent_seconds{slot}``               how long the server has sent nothing while waited for
``reconnects_total{slot}``             replication connections re-established
``connected{slot}``                    1 while the replication connection is up
=====================================  ===========================================
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import socketserver
import threading
import time
import weakref
from collections import Counter as _Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from .errors import ConfigurationError
from .events import Batch
from .stream import Stream

try:
    from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
    from prometheus_client import Counter as _Counter
    from prometheus_client import Histogram as _Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ModuleNotFoundError(
        'walex.metrics needs prometheus-client: pip install "walex[metrics]"',
        name="prometheus_client",
    ) from exc

__all__ = ["Metrics", "MetricsServer", "lag_bytes"]

logger = logging.getLogger(__name__)

_HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_READ_TIMEOUT = 10.0  # seconds a client may stay silent while it sends its request
# How long a request waits for the event loop to read the streams. As before,
# an answer waits while the loop is busy, but a loop stuck this long makes
# /healthz answer 503 and /metrics 500 rather than hang.
_LOOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class _Reading:
    """One stream's state, read at once on its event loop."""

    slot: str
    confirmed: int
    wal_end: int
    received: int
    reconnects: int
    connected: bool
    handled_commit: float | None  # POSIX time of the newest handled transaction's commit
    silent: float

    @classmethod
    def of(cls, stream: Stream) -> _Reading:
        handled = stream.handled_commit_timestamp
        return cls(
            stream.slot,
            int(stream.confirmed_lsn),
            int(stream.server_wal_end),
            int(stream.received_lsn),
            stream.reconnects,
            stream.connected,
            handled.timestamp() if handled is not None else None,
            stream.silent_for,
        )

    @property
    def lag_seconds(self) -> float:
        """0 when caught up; else how old the newest handled change is."""
        if not self.lag or self.handled_commit is None:
            return 0.0
        return max(0.0, time.time() - self.handled_commit)

    @property
    def lag(self) -> int:
        return _lag(self.wal_end, self.confirmed)


class _StreamCollector(Collector):
    """Reads the tracked streams' positions when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics()
        readings = metrics._readings() if metrics is not None else []
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
        lag_seconds = GaugeMetricFamily(
            f"{prefix}_lag_seconds",
            "While behind the server: seconds since the commit of the newest handled "
            "transaction; 0 when caught up.",
            labels=["slot"],
        )
        silent = GaugeMetricFamily(
            f"{prefix}_silent_seconds",
            "Seconds the server has sent nothing while walex waits for it (a dead link "
            "grows it until receive_timeout).",
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
        for reading in readings:
            labels = [reading.slot]
            confirmed.add_metric(labels, float(reading.confirmed))
            wal_end.add_metric(labels, float(reading.wal_end))
            received.add_metric(labels, float(reading.received))
            lag.add_metric(labels, float(reading.lag))
            lag_seconds.add_metric(labels, reading.lag_seconds)
            silent.add_metric(labels, reading.silent)
            reconnects.add_metric(labels, float(reading.reconnects))
            connected.add_metric(labels, 1.0 if reading.connected else 0.0)
        yield from (confirmed, wal_end, received, lag, lag_seconds, silent, reconnects, connected)


def lag_bytes(stream: Stream) -> int:
    """How far *stream* is behind: server WAL end - confirmed position, never negative.

    0 until the server has reported its WAL end.
    """
    return _lag(int(stream.server_wal_end), int(stream.confirmed_lsn))


def _lag(wal_end: int, confirmed: int) -> int:
    if not wal_end:
        return 0
    return max(0, wal_end - confirmed)


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
        # The loop the tracked streams run on: a read from another thread
        # (the HTTP server's, or a shared registry's) is done there.
        self._loop: asyncio.AbstractEventLoop | None = None
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
        """Report *stream*'s positions, lag, reconnects and connection state.

        Call it on the event loop the stream runs on: the metrics and the
        health check read the stream there.
        """
        with contextlib.suppress(RuntimeError):  # no loop here: reads stay on the caller
            self._loop = asyncio.get_running_loop()
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
            stream is not up yet, or waits as a standby), and when called
            from another thread while the streams' event loop does not answer.
        """
        try:
            readings = self._readings()
        except TimeoutError as exc:
            return False, [str(exc)]
        problems: list[str] = []
        if not readings:
            problems.append("no stream is running")
        for reading in readings:
            if not reading.connected:
                problems.append(f"slot {reading.slot}: not connected")
                continue
            lag, limit = reading.lag, self.max_lag_bytes
            if limit is not None and lag > limit:
                problems.append(
                    f"slot {reading.slot}: lag {lag} bytes is over the limit of {limit}"
                )
        return not problems, problems

    def _readings(self) -> list[_Reading]:
        """The tracked streams' state, read on their event loop.

        A stream changes on its loop and reads several fields at once (say
        ``connected``), so another thread asks the loop to read and waits.

        Raises:
            TimeoutError: the loop did not answer within ``_LOOP_TIMEOUT``.
        """
        loop = self._loop
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                loop = None
        if loop is None or not loop.is_running():
            # On the loop, or no loop runs the streams any more: nothing changes them.
            return [_Reading.of(stream) for stream in list(self.streams)]
        answer: concurrent.futures.Future[list[_Reading]] = concurrent.futures.Future()

        def read() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result([_Reading.of(stream) for stream in list(self.streams)])
                except BaseException as exc:
                    answer.set_exception(exc)

        try:
            loop.call_soon_threadsafe(read)
        except RuntimeError:  # the loop closed since: nothing changes the streams any more
            return [_Reading.of(stream) for stream in list(self.streams)]
        try:
            return answer.result(timeout=_LOOP_TIMEOUT)
        except TimeoutError:
            answer.cancel()
            raise TimeoutError(
                f"the event loop did not answer within {_LOOP_TIMEOUT:g} s (is it blocked?)"
            ) from None

    # -- serving -------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 9187) -> MetricsServer:
        """Serve ``/metrics`` and ``/healthz`` over HTTP, on a thread of its own.

        ``GET``/``HEAD /metrics`` answers the Prometheus exposition of
        :attr:`registry` (``prometheus_client.make_wsgi_app``: OpenMetrics
        and gzip when the scraper asks for them, ``name[]`` filters);
        ``GET``/``HEAD /healthz`` (or ``/health``) answers 200 with
        ``{"status": "ok", "problems": []}``, or 503 with the problems of
        :meth:`health`. Another path answers 404, another method 405.

        Args:
            host: the address to listen on (``"0.0.0.0"`` for every IPv4
                interface, ``"::"`` for IPv6 too); a name listens on the
                first address it resolves to.
            port: the TCP port; 0 picks a free one (see the returned server's
                ``sockets[0].getsockname()``).

        Returns:
            The listening server; ``server.close()`` then
            ``await server.wait_closed()`` stops it (or ``async with``).

        Raises:
            OSError: the address cannot be listened on (the port is taken,
                say); the message names the address.
        """
        self._loop = asyncio.get_running_loop()
        try:
            infos = await self._loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, address = infos[0]

            class Server(_ThreadingWSGIServer):
                address_family = family

            httpd = make_server(
                str(address[0]), port, self._wsgi_app(), Server, handler_class=_RequestHandler
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        server = MetricsServer(httpd)
        bound = httpd.socket.getsockname()
        logger.info("metrics on http://%s:%s/metrics, health on /healthz", bound[0], bound[1])
        return server

    def _wsgi_app(self) -> WSGIApplication:
        """Route ``/metrics`` to prometheus_client's app and ``/healthz`` to :meth:`health`."""
        exposition = make_wsgi_app(self.registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            method = environ["REQUEST_METHOD"]
            try:
                status, headers, body = self._answer(exposition, environ)
            except Exception as exc:
                # Logged here rather than by wsgiref on stderr; the 500 says why.
                logger.exception("metrics: %s %s failed", method, environ["PATH_INFO"])
                status, headers = "500 Internal Server Error", []
                body = f"could not answer: {exc}\n".encode()
            if not any(name.lower() == "content-type" for name, _ in headers):
                headers.append(("Content-Type", "text/plain; charset=utf-8"))
            headers += [("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
            start_response(status, headers)
            return [] if method == "HEAD" else [body]

        return app

    def _answer(
        self, exposition: WSGIApplication, environ: WSGIEnvironment
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status, headers and body for one request."""
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", [("Allow", "GET, HEAD")], b"method not allowed\n"
        if path == "/metrics":
            # prometheus_client answers GET only; HEAD is the same answer without its body.
            return _call(exposition, {**environ, "REQUEST_METHOD": "GET"})
        if path in ("/healthz", "/health"):
            healthy, problems = self.health()
            doc = {"status": "ok" if healthy else "unhealthy", "problems": problems}
            return (
                "200 OK" if healthy else "503 Service Unavailable",
                [("Content-Type", "application/json")],
                json.dumps(doc).encode() + b"\n",
            )
        return "404 Not Found", [], b"not found: try /metrics or /healthz\n"


def _call(
    app: WSGIApplication, environ: WSGIEnvironment
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Run a WSGI app to the end: its status, headers and whole body."""
    answer: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None, /
    ) -> Callable[[bytes], object]:
        answer[:] = [(status, list(headers))]
        return written.append

    chunks = app(environ, start_response)
    body = b"".join([*written, *chunks])
    status, headers = answer[0]
    return status, headers, body


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request, none of them waited for at exit (as prometheus_client's own)."""

    daemon_threads = True


class _RequestHandler(WSGIRequestHandler):
    """wsgiref's handler, with a read timeout and its log in walex's logger, not on stderr."""

    def setup(self) -> None:
        # Read when the client connects, so that a test can shorten it.
        self.request.settimeout(_READ_TIMEOUT)
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError) as exc:
            logger.debug("metrics client dropped: %r", exc)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("metrics request from %s: " + format, self.address_string(), *args)


class MetricsServer:
    """The HTTP server that :meth:`Metrics.serve` started, on a thread of its own.

    It has the part of :class:`asyncio.Server` that callers use:
    :attr:`sockets`, :meth:`close`, :meth:`wait_closed`, :meth:`is_serving`,
    :meth:`serve_forever` and ``async with``.
    """

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd
        self._closing = False
        self._lock = threading.Lock()
        self._closed = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread = threading.Thread(
            target=self._serve, name="walex-metrics-server", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()
            with self._lock:
                self._closed = True
                waiters, self._waiters = self._waiters, []
            for loop, waiter in waiters:
                with contextlib.suppress(RuntimeError):  # that loop is closed: no one waits
                    loop.call_soon_threadsafe(_resolve, waiter)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (empty once closed)."""
        return () if self._closing else (self._httpd.socket,)

    def is_serving(self) -> bool:
        """Whether it accepts connections (until :meth:`close`)."""
        return not self._closing

    def close(self) -> None:
        """Stop serving; it returns at once (:meth:`wait_closed` waits for the end)."""
        if self._closing:
            return
        self._closing = True
        # shutdown() waits for the serving thread's next poll (up to 0.5 s): not on the loop.
        threading.Thread(
            target=self._httpd.shutdown, name="walex-metrics-stop", daemon=True
        ).start()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and its socket released."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with self._lock:
            if self._closed:
                return
            self._waiters.append((loop, waiter))
        await waiter

    async def serve_forever(self) -> None:
        """Wait until the server is closed; cancelling this closes it."""
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.close()
            raise

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # not cancelled meanwhile
        waiter.set_result(None)

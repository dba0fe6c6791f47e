"""walex.metrics against a real stream: counters, positions, lag, /metrics and /healthz."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import gzip
import http.client
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import walex
from tests.fix_pg import Database
from walex.metrics import Metrics


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    """A minimal HTTP client: status, headers, body."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def fetch(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """The same from another thread, with http.client: status, headers, raw body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_and_health_of_a_real_stream(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("metrics")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    metrics = Metrics(max_lag_bytes=0)
    server = await metrics.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # Nothing tracked yet: not healthy (not started, or waiting as a standby).
        status, _, body = await http_get(port, "/healthz")
        assert status == 503
        assert "no stream is running" in body

        async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
            metrics.track_stream(stream)
            db.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
            db.execute("UPDATE t SET v = 'c' WHERE id = 1")
            async with asyncio.timeout(20):
                first = await anext(stream)
                metrics.on_batch(first, 0.002)
                metrics.on_handler("app.on_insert", "public.t", "insert", 0.001, None)
                metrics.on_handler("app.on_insert", "public.t", "insert", 0.3, ValueError("x"))
                # The second batch is held, not handled: the slot is behind.
                second = await anext(stream)
                metrics.on_batch(second, 0.001)
            status, _, body = await http_get(port, "/healthz")
            assert status == 503
            assert f"slot {slot}: lag " in body
            assert "over the limit of 0" in body

            status, headers, text = await http_get(port, "/metrics")
            assert status == 200
            assert headers["Content-Type"].startswith("text/plain; version=")
            got = samples(text)
            label = (("slot", slot),)
            assert got[("walex_events_total", (("table", "public.t"), ("type", "insert")))] == 2
            assert got[("walex_events_total", (("table", "public.t"), ("type", "update")))] == 1
            assert got[("walex_batches_total", ())] == 2
            assert got[("walex_batch_duration_seconds_count", ())] == 2
            assert (
                got[("walex_handler_duration_seconds_count", (("handler", "app.on_insert"),))] == 2
            )
            errors = (("handler", "app.on_insert"), ("table", "public.t"), ("type", "insert"))
            assert got[("walex_handler_errors_total", errors)] == 1
            assert got[("walex_connected", label)] == 1
            assert got[("walex_reconnects_total", label)] == 0
            assert got[("walex_confirmed_lsn", label)] == float(stream.confirmed_lsn)
            assert got[("walex_server_wal_end_lsn", label)] == float(stream.server_wal_end)
            assert got[("walex_received_lsn", label)] >= float(first.commit_lsn)
            lag = got[("walex_lag_bytes", label)]
            assert lag == float(stream.server_wal_end) - float(stream.confirmed_lsn)
            assert lag > 0
            # Behind: the age of the newest handled commit (the first batch's).
            age = time.time() - first.commit_timestamp.timestamp()
            assert 0 < got[("walex_lag_seconds", label)] <= age + 1
            assert got[("walex_silent_seconds", label)] == 0  # not waiting: handling

            # A limit above the lag: healthy.
            metrics.max_lag_bytes = 10 * 1024 * 1024
            status, _, body = await http_get(port, "/healthz")
            assert (status, body) == (200, '{"status": "ok", "problems": []}\n')

            status, headers, body = await http_get(port, "/metrics", method="HEAD")
            assert (status, body) == (200, "")
            assert int(headers["Content-Length"]) > 0

        # The stream is closed: unhealthy, and the gauge says so.
        status, _, body = await http_get(port, "/healthz")
        assert status == 503
        assert f"slot {slot}: not connected" in body
        assert samples(metrics.exposition().decode())[("walex_connected", (("slot", slot),))] == 0

        assert (await http_get(port, "/nope"))[0] == 404
        assert (await http_get(port, "/metrics", method="POST"))[0] == 405
    finally:
        server.close()
        await server.wait_closed()


async def test_a_client_that_sends_nothing_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("walex.metrics._READ_TIMEOUT", 0.2)
    metrics = Metrics()
    server = await metrics.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        assert time.monotonic() - started < 4
        # The server still answers others.
        assert (await http_get(port, "/metrics"))[0] == 200
    finally:
        server.close()
        await server.wait_closed()


def test_metrics_instances_do_not_clash() -> None:
    one, two = Metrics(), Metrics(namespace="cdc")
    assert b"\nwalex_events_total{" not in one.exposition()  # no samples before any event
    assert b"# HELP cdc_batches_total" in two.exposition()
    with pytest.raises(walex.errors.ConfigurationError):
        Metrics(max_lag_bytes=-1)


async def test_metrics_as_an_app_observer(db: Database) -> None:
    from walex.app import WalEx

    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    metrics = Metrics()
    app = WalEx(
        "metrics",
        url=db.dsn,
        publication=pub,
        durable_slot=False,
        slot_name=db.unique("app"),
        observers=[metrics],
    )
    seen: asyncio.Queue[int] = asyncio.Queue()

    @app.on_insert("t", name="on_t")
    async def on_t(events: list[walex.Event]) -> None:
        for event in events:
            seen.put_nowait((event.new_record or {})["id"])

    async with app:
        db.execute("INSERT INTO t VALUES (1), (2)")
        async with asyncio.timeout(20):
            assert [await seen.get(), await seen.get()] == [1, 2]
    # The app stopped gracefully: the batch in hand was finished, observers included.
    got = samples(metrics.exposition().decode())
    assert got[("walex_events_total", (("table", "public.t"), ("type", "insert")))] == 2
    assert got[("walex_batches_total", ())] == 1
    assert got[("walex_handler_duration_seconds_count", (("handler", "on_t"),))] == 1


async def test_the_server_answers_get_and_head_on_two_paths_only() -> None:
    metrics = Metrics()
    metrics.batches.inc()
    async with await metrics.serve("127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        assert server.sockets[0].getsockname()[0] == "127.0.0.1"  # only the host asked for
        assert server.is_serving()

        status, headers, body = await asyncio.to_thread(fetch, port, "/healthz")
        assert status == 503
        for path in ("/healthz", "/health"):
            head = await asyncio.to_thread(fetch, port, path, "HEAD")
            assert head == (503, {**head[1], "Content-Length": str(len(body))}, b"")
            assert head[1]["Content-Type"] == "application/json"

        # prometheus_client's app: it compresses when asked, and HEAD is GET without the body.
        status, headers, body = await asyncio.to_thread(
            fetch, port, "/metrics", "GET", {"Accept-Encoding": "gzip"}
        )
        assert (status, headers["Content-Encoding"]) == (200, "gzip")
        assert samples(gzip.decompress(body).decode())[("walex_batches_total", ())] == 1
        plain = (await asyncio.to_thread(fetch, port, "/metrics"))[2]
        status, headers, body = await asyncio.to_thread(fetch, port, "/metrics", "HEAD")
        assert (status, body, int(headers["Content-Length"])) == (200, b"", len(plain))

        # Another method: 405 on any path (prometheus_client alone would answer OPTIONS).
        for method, path in (("OPTIONS", "/metrics"), ("POST", "/healthz"), ("PUT", "/nope")):
            status, headers, _ = await asyncio.to_thread(fetch, port, path, method)
            assert (status, headers["Allow"]) == (405, "GET, HEAD")
        # Another path: 404 (prometheus_client alone serves the metrics on every path).
        for path in ("/", "/favicon.ico", "/metrics/x"):
            assert (await asyncio.to_thread(fetch, port, path))[0] == 404
    assert not server.is_serving()
    assert server.sockets == ()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.to_thread(fetch, port, "/metrics")


async def test_a_port_in_use_says_which() -> None:
    metrics = Metrics()
    async with await metrics.serve("127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}") as info:
            await metrics.serve("127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE


async def test_a_blocked_event_loop_makes_answers_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answers on its own thread; what it reads of the streams it reads on the loop."""
    monkeypatch.setattr("walex.metrics._LOOP_TIMEOUT", 0.2)
    metrics = Metrics()
    async with await metrics.serve("127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            health = pool.submit(fetch, port, "/healthz")
            scrape = pool.submit(fetch, port, "/metrics")
            # Blocks the event loop on purpose until both have answered.
            status, _, body = health.result(timeout=10)
            assert status == 503
            assert b"the event loop did not answer within 0.2 s" in body
            status, _, body = scrape.result(timeout=10)
            assert status == 500
            assert b"the event loop did not answer within 0.2 s" in body
        # The loop is free again: the same requests are answered.
        assert (await asyncio.to_thread(fetch, port, "/metrics"))[0] == 200
        status, _, body = await asyncio.to_thread(fetch, port, "/healthz")
        assert (status, body) == (
            503,
            b'{"status": "unhealthy", "problems": ["no stream is running"]}\n',
        )

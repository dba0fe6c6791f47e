"""Destination benchmark: events/s into each destination, next to the engine's drain.

Runs a throw-away Postgres (walex.embedded), makes one durable slot per run
(all created before the backlog, so each sees the same changes), writes a
backlog of small transactions, then drains each slot in this process:

- ``engine``: walex alone, the events thrown away: the ceiling;
- ``file``, ``redis``, ``nats``, ``rabbitmq``, ``mqtt``, ``webhook``: walex
  delivering every batch to the destination with :class:`Deliverer`, each
  batch confirmed only after the destination accepted it.

The brokers are the local ones (see tests/fix_services.py for the addresses
and the ``WALEX_TEST_*`` variables); one that is not running is reported and
left out. The webhook posts batches of 100 to a local ``http.server``.

Usage::

    python bench/destinations.py                       # 20,000 changes, every destination
    python bench/destinations.py --changes 50000 --only engine,nats,redis
    python bench/destinations.py --txn-size 500   # large transactions: larger batches

A timing is not a test: this prints figures and exits 0 (non-zero only when a
destination did not get every change).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

import walex
from walex.destinations import Deliverer, Destination, RetryPolicy, Route, from_config
from walex.embedded import EmbeddedPostgres, find_binaries

PUBLICATION = "bench_dest"
ROWS_PER_TXN = 10  # default: 10 inserts per transaction, then updates of the same rows
SERVICES = {
    "redis": ("WALEX_TEST_REDIS", "redis://127.0.0.1:6379/0"),
    "nats": ("WALEX_TEST_NATS", "nats://127.0.0.1:4222"),
    "rabbitmq": ("WALEX_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
    "mqtt": ("WALEX_TEST_MQTT", "mqtt://127.0.0.1:1883"),
}
ALL = ["engine", "file", "redis", "nats", "rabbitmq", "mqtt", "webhook"]


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError:
        return False
    return True


class Webhook:
    """A local receiver that answers 204 to everything."""

    def __enter__(self) -> str:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


async def cleanup(kind: str, url: str, tag: str) -> None:
    """Remove what a run left in the broker."""
    if kind == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        keys = await client.keys(f"{tag}:*")
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif kind == "nats":
        import nats

        nc = await nats.connect(url)
        try:
            await nc.jetstream().delete_stream(tag.upper())
        finally:
            await nc.close()
    elif kind == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(url)
        channel = await conn.channel()
        await channel.queue_delete(tag)
        await channel.exchange_delete(tag)
        await conn.close()


async def prepare(kind: str, url: str, tag: str) -> dict[str, Any]:
    """The destination's settings, with whatever receives its messages made."""
    if kind == "redis":
        return {"type": "redis", "url": url, "stream": f"{tag}:{{table}}"}
    if kind == "nats":
        return {
            "type": "nats",
            "servers": url,
            "subject": f"{tag}.{{table}}.{{pk}}",
            "stream": tag.upper(),
            "create_stream": True,
        }
    if kind == "rabbitmq":
        import aio_pika

        conn = await aio_pika.connect(url)
        channel = await conn.channel()
        exchange = await channel.declare_exchange(tag, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(tag, durable=True)
        await queue.bind(exchange, "#")
        await conn.close()
        return {"type": "rabbitmq", "url": url, "exchange": tag, "routing_key": "{table}.{pk}"}
    if kind == "mqtt":
        parts = urlsplit(url)
        return {
            "type": "mqtt",
            "host": parts.hostname,
            "port": parts.port,
            "topic": f"{tag}/{{table}}/{{pk}}",
        }
    raise AssertionError(kind)


async def drain(dsn: str, slot: str, changes: int, dest: Destination | None) -> float:
    """Seconds to take *changes* changes from *slot* (into *dest*, if any)."""
    seen = 0
    async with walex.connect(dsn, publication=PUBLICATION, slot=slot, durable=True) as stream:
        deliverer = (
            Deliverer([Route(dest, retries=3, policy=RetryPolicy(initial=0.1))])
            if dest is not None
            else None
        )
        if deliverer is not None:
            await deliverer.start()
        try:
            started = time.perf_counter()
            async with asyncio.timeout(600):
                async for batch in stream:
                    if deliverer is not None:
                        await deliverer.handle(batch)
                    seen += len(batch)
                    if seen >= changes:
                        break
            took = time.perf_counter() - started
        finally:
            if deliverer is not None:
                await deliverer.close()
    if seen != changes:
        raise SystemExit(f"{slot}: saw {seen} changes, expected {changes}")
    return took


def write_backlog(conn: psycopg.Connection[Any], changes: int, size: int) -> int:
    """Transactions of *size* inserts, then as many of updates; returns the count."""
    txns = max(1, changes // size // 2)
    for t in range(txns):
        first = t * size + 1
        last = first + size - 1
        with conn.transaction():
            conn.execute(
                "INSERT INTO item SELECT g, 0, md5(g::text), now()"
                " FROM generate_series(%s::int, %s::int) g",
                (first, last),
            )
    for t in range(txns):
        first = t * size + 1
        last = first + size - 1
        with conn.transaction():
            conn.execute(
                "UPDATE item SET v = v + 1, at = now() WHERE id BETWEEN %s AND %s", (first, last)
            )
    return txns * size * 2


async def run(args: argparse.Namespace) -> int:
    wanted = args.only.split(",") if args.only else ALL
    binaries = max(find_binaries(), key=lambda b: b.major)
    tag = f"bench{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, Webhook() as hook_url:
        server = EmbeddedPostgres(binaries)
        server.start()
        try:
            dsn = server.create_database("bench")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "CREATE TABLE item (id int PRIMARY KEY, v int, h text, at timestamptz)"
                )
                conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE item")
                runs: list[str] = []
                for kind in wanted:
                    if kind in SERVICES:
                        variable, default = SERVICES[kind]
                        url = os.environ.get(variable, default)
                        if not reachable(url):
                            print(f"{kind:<9} skipped: nothing listens at {url}")
                            continue
                    runs.append(kind)
                    conn.execute(
                        "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (f"b_{kind}",)
                    )
                started = time.perf_counter()
                changes = write_backlog(conn, args.changes, args.txn_size)
                wrote = time.perf_counter() - started
            print(
                f"Postgres {binaries.version}; backlog: {changes} changes in "
                f"{changes // args.txn_size} transactions of {args.txn_size}, "
                f"written in {wrote:.1f} s"
            )
            print(f"{'run':<9} {'events/s':>10} {'seconds':>8}  vs engine")
            engine_rate: float | None = None
            for kind in runs:
                dest: Destination | None = None
                url = ""
                if kind == "file":
                    dest = from_config({"type": "file", "path": str(Path(tmp) / "out.jsonl")})
                elif kind == "webhook":
                    dest = from_config({"type": "webhook", "url": hook_url, "batch": True})
                elif kind != "engine":
                    url = os.environ.get(*SERVICES[kind])
                    dest = from_config(await prepare(kind, url, tag))
                try:
                    took = await drain(dsn, f"b_{kind}", changes, dest)
                finally:
                    if url:
                        await cleanup(kind, url, tag)
                per_s = changes / took
                if kind == "engine":
                    engine_rate = per_s
                share = f"{per_s / engine_rate:6.0%}" if engine_rate else "     -"
                print(f"{kind:<9} {per_s:>10,.0f} {took:>8.2f}  {share}")
        finally:
            server.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--changes", type=int, default=20000, help="changes in the backlog")
    parser.add_argument(
        "--txn-size", type=int, default=ROWS_PER_TXN, help="rows per transaction (a batch)"
    )
    parser.add_argument("--only", help=f"comma-separated runs out of {','.join(ALL)}")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

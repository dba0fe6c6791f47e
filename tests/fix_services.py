"""Brokers for the destination tests: reachability, sinks that read back, a TCP proxy.

The services are the real ones on this machine (Redis, RabbitMQ, NATS with
JetStream, Mosquitto), at their usual local ports or where the environment
says (``WALEX_TEST_REDIS``, ``WALEX_TEST_NATS``, ``WALEX_TEST_AMQP``,
``WALEX_TEST_MQTT``). A test whose service is absent skips and says why;
with ``CI`` set it fails instead, so that CI cannot pass without testing.

A *sink* is one service seen from the test: the destination settings that
write to it (for :func:`walex.destinations.from_config`, optionally through a
proxy port) and a reader that returns what arrived there, in order.

Run as a program, this module is the consumer that the kill -9 tests start::

    python -m tests.fix_services DSN PUBLICATION SLOT DESTINATION_JSON
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.fix_pg import Database, _server, requested_majors, unique_name

__all__ = [
    "SERVICES",
    "Sink",
    "TcpProxy",
    "cdc_db",
    "require_service",
    "sink",
]

SERVICES: dict[str, tuple[str, str]] = {
    # name: (environment variable, default address)
    "redis": ("WALEX_TEST_REDIS", "redis://127.0.0.1:6379/0"),
    "nats": ("WALEX_TEST_NATS", "nats://127.0.0.1:4222"),
    "rabbitmq": ("WALEX_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"),
    "mqtt": ("WALEX_TEST_MQTT", "mqtt://127.0.0.1:1883"),
}
_CLIENTS = {"redis": "redis", "nats": "nats", "rabbitmq": "aio_pika", "mqtt": "aiomqtt"}


def _absent(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the destination tests are mandatory)", pytrace=False)
    pytest.skip(reason)


def require_service(name: str) -> str:
    """The URL of service *name*; skip (fail under CI) when it cannot be reached."""
    variable, default = SERVICES[name]
    url = os.environ.get(variable, default)
    try:
        importlib.import_module(_CLIENTS[name])
    except ImportError:
        _absent(f"the {name} client library is not installed: pip install -e '.[test]'")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    assert port is not None, url
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        _absent(f"{name} is not running at {host}:{port} ({exc}); set {variable} to its URL")
    return url


# -- one Postgres version is enough for a destination ---------------------


@pytest.fixture
def cdc_db(request: pytest.FixtureRequest) -> Iterator[Database]:
    """A fresh database on the newest Postgres under test, not parametrized.

    What a destination does with events does not depend on the Postgres
    version; the engine path stays real.
    """
    server = _server(max(requested_majors()))
    server.start()
    database = Database(server, unique_name(f"d_{request.node.name}"[:40]))
    try:
        yield database
    finally:
        database.drop()


# -- a TCP proxy that can cut connections ---------------------------------


class TcpProxy:
    """A local TCP proxy to *host*:*port*, run in its own thread and event loop.

    :meth:`cut` aborts every open connection (both sides see a reset) and
    refuses new ones for a while: a broker connection that breaks mid-stream.
    :meth:`black_hole` stops carrying bytes, on open and new connections
    alike, without closing anything (a partition, a dead middlebox: neither
    side hears of it); :meth:`heal` carries on with what was held back.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._abort_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)

    def black_hole(self) -> None:
        """Stop carrying bytes (open connections stay open, new ones hang)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        """Carry bytes again, those held back first."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def cut(self, refuse_for: float = 0.0) -> None:
        """Reset every connection now; refuse new ones for *refuse_for* seconds.

        Refused means nothing listens (connection refused), as when the
        broker is down.
        """
        asyncio.run_coroutine_threadsafe(self._cut(refuse_for), self._loop).result(10)

    async def _cut(self, refuse_for: float) -> None:
        if refuse_for > 0 and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._loop.call_later(refuse_for, lambda: asyncio.ensure_future(self._reopen()))
        self._abort_all()

    async def _reopen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )


def proxied(url: str, proxy: TcpProxy) -> str:
    """*url* with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    creds = netloc[0] + "@" if len(netloc) == 2 else ""
    return parts._replace(netloc=f"{creds}127.0.0.1:{proxy.port}").geturl()


def target_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.port is not None
    return parts.hostname or "127.0.0.1", parts.port


# -- sinks: write there, read back ----------------------------------------


class Sink:
    """One service as the tests see it.

    Attributes:
        kind: the destination type (``"redis"``...).
        url: where the service is.
        tag: a name unique to this test, used for streams, subjects, queues, topics.
    """

    kind = ""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tag = f"t{uuid.uuid4().hex[:10]}"

    def config(self, url: str | None = None, **extra: Any) -> dict[str, Any]:
        """Destination settings for :func:`walex.destinations.from_config`."""
        raise NotImplementedError

    async def setup(self) -> None:
        """Make what the destination writes into (stream, queue, subscription)."""

    async def received(self) -> list[dict[str, Any]]:
        """Every event that arrived so far, as wire dicts, in arrival order."""
        raise NotImplementedError

    async def teardown(self) -> None:
        """Remove what :meth:`setup` made."""


class RedisSink(Sink):
    kind = "redis"

    def config(self, url: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"type": "redis", "url": url or self.url, "stream": f"{self.tag}:{{table}}", **extra}

    async def setup(self) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(self.url)

    async def received(self) -> list[dict[str, Any]]:
        keys = sorted(await self.client.keys(f"{self.tag}:*"))
        out: list[dict[str, Any]] = []
        for key in keys:
            for _entry_id, fields in await self.client.xrange(key):
                event = json.loads(fields[b"event"])
                assert fields[b"id"].decode() == event["id"]
                out.append(event)
        return out

    async def teardown(self) -> None:
        keys = await self.client.keys(f"{self.tag}:*")
        if keys:
            await self.client.delete(*keys)
        await self.client.aclose()


class NatsSink(Sink):
    kind = "nats"

    def config(self, url: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "type": "nats",
            "servers": url or self.url,
            "subject": f"{self.tag}.{{table}}.{{pk}}",
            "stream": self.tag.upper(),
            "create_stream": True,
            **extra,
        }

    async def setup(self) -> None:
        import nats

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()

    async def received(self) -> list[dict[str, Any]]:
        import nats.js.errors

        try:
            info = await self.js.stream_info(self.tag.upper())
        except nats.js.errors.NotFoundError:
            return []
        if not info.state.messages:
            return []
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await self.js.get_msg(self.tag.upper(), seq)
            assert msg.data is not None
            event = json.loads(msg.data)
            assert msg.headers is not None
            assert msg.headers["Nats-Msg-Id"] == event["id"]
            out.append(event)
        return out

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.tag.upper())
        await self.nc.close()


class RabbitSink(Sink):
    kind = "rabbitmq"

    def config(self, url: str | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "type": "rabbitmq",
            "url": url or self.url,
            "exchange": self.tag,
            "routing_key": "{schema}.{table}.{pk}",
            **extra,
        }

    async def setup(self) -> None:
        import aio_pika

        self.conn = await aio_pika.connect(self.url)
        channel = await self.conn.channel()
        exchange = await channel.declare_exchange(
            self.tag, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self.queue = await channel.declare_queue(self.tag, durable=True)
        await self.queue.bind(exchange, "#")
        self.messages: list[dict[str, Any]] = []

        async def on_message(message: Any) -> None:
            event = json.loads(message.body)
            assert message.message_id == event["id"]
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            self.messages.append(event)
            await message.ack()

        await self.queue.consume(on_message)

    async def received(self) -> list[dict[str, Any]]:
        await asyncio.sleep(0.2)  # deliveries from the broker to this consumer
        return list(self.messages)

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.queue.delete(if_unused=False, if_empty=False)
        channel = await self.conn.channel()
        with contextlib.suppress(Exception):
            await channel.exchange_delete(self.tag)
        await self.conn.close()


class MqttSink(Sink):
    kind = "mqtt"

    def config(self, url: str | None = None, **extra: Any) -> dict[str, Any]:
        host, port = target_of(url or self.url)
        return {
            "type": "mqtt",
            "host": host,
            "port": port,
            "topic": f"{self.tag}/{{table}}/{{pk}}",
            "timeout": 3.0,
            **extra,
        }

    async def setup(self) -> None:
        import aiomqtt

        host, port = target_of(self.url)
        self.client = aiomqtt.Client(host, port, identifier=f"{self.tag}-reader")
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.tag}/#", qos=1)
        self.messages: list[dict[str, Any]] = []

        async def read() -> None:
            async for message in self.client.messages:
                assert isinstance(message.payload, bytes)
                self.messages.append(json.loads(message.payload))

        self.reader = asyncio.ensure_future(read())

    async def received(self) -> list[dict[str, Any]]:
        await asyncio.sleep(0.2)  # deliveries from the broker to this subscriber
        return list(self.messages)

    async def teardown(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await self.client.__aexit__(None, None, None)


_SINKS: dict[str, type[Sink]] = {
    "redis": RedisSink,
    "nats": NatsSink,
    "rabbitmq": RabbitSink,
    "mqtt": MqttSink,
}


@contextlib.asynccontextmanager
async def sink(kind: str) -> AsyncIterator[Sink]:
    """The sink of *kind*, set up for this test and removed after it."""
    made = _SINKS[kind](require_service(kind))
    await made.setup()
    try:
        yield made
    finally:
        await made.teardown()


# -- a workload whose order can be checked --------------------------------

KEYS = 8


def make_item_table(db: Database) -> tuple[str, str]:
    """A table ``item (id, v)`` in a new publication; (publication, slot) names."""
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute("CREATE TABLE item (id int PRIMARY KEY, v int NOT NULL)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE item")
    return pub, slot


class Workload:
    """Writes to ``item`` from a thread: :data:`KEYS` rows, then updates in
    small transactions, each row's ``v`` counting up from 0; the last
    transaction inserts the row ``id = -1``.

    Attributes:
        events: how many changes it made, once it is done.
    """

    def __init__(self, db: Database, transactions: int, pause: float = 0.0) -> None:
        self.db = db
        self.transactions = transactions
        self.pause = pause
        self.events = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Workload:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(60)
        assert self.done.is_set(), "the workload did not finish"

    def _run(self) -> None:
        with self.db.connect() as conn:
            conn.execute("INSERT INTO item SELECT g, 0 FROM generate_series(1, %s) g", (KEYS,))
            count = KEYS
            for n in range(self.transactions):
                keys = [(n * 3 + k) % KEYS + 1 for k in range(3)]
                with conn.transaction():
                    for key in keys:
                        conn.execute("UPDATE item SET v = v + 1 WHERE id = %s", (key,))
                count += len(keys)
                if self.pause:
                    time.sleep(self.pause)
            conn.execute("INSERT INTO item VALUES (-1, 0)")
            self.events = count + 1
        self.done.set()


def first_copies(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """*received* without replays: the first event with each id."""
    seen: set[str] = set()
    out = []
    for event in received:
        if event["id"] not in seen:
            seen.add(event["id"])
            out.append(event)
    return out


def check_complete_in_order(received: list[dict[str, Any]], expected: int) -> None:
    """Every change of :class:`Workload` arrived, and each row's in commit order."""
    unique = first_copies(received)
    assert len(unique) == expected, f"{len(unique)} distinct events, expected {expected}"
    per_row: dict[int, list[int]] = {}
    for event in unique:
        row = event["new_record"]
        per_row.setdefault(row["id"], []).append(row["v"])
        assert event["primary_key"] == {"id": row["id"]}
    marker = per_row.pop(-1)
    assert marker == [0]
    for key, values in per_row.items():
        assert values == list(range(len(values))), f"row {key} out of order: {values}"


async def received_until(snk: Sink, expected: int, wait: float = 30.0) -> list[dict[str, Any]]:
    """What *snk* received, once *expected* distinct events are there (or *wait* s passed)."""
    deadline = time.monotonic() + wait
    while True:
        received = await snk.received()
        if len(first_copies(received)) >= expected or time.monotonic() > deadline:
            return received
        await asyncio.sleep(0.2)


def make_events(count: int, table: str = "item", start: int = 1) -> list[Any]:
    """*count* hand-made insert events of one transaction, for tests that need
    no Postgres (the events a stream gives are tested elsewhere)."""
    from datetime import UTC, datetime

    from walex.events import Event, Source, Transaction
    from walex.lsn import LSN

    source = Source(
        database="app",
        schema="public",
        table=table,
        columns={"id": "integer", "v": "integer"},
        primary_key=("id",),
        replica_identity="default",
        identity_columns=("id",),
        relation_oid=16384,
    )
    txn = Transaction(700 + start, LSN(0x16B374D848 + start * 1000), datetime.now(UTC))
    return [
        Event(
            "insert",
            source,
            {"id": i, "v": 0},
            None,
            frozenset(),
            LSN(txn.commit_lsn - 100 + n),
            n,
            txn,
        )
        for n, i in enumerate(range(start, start + count))
    ]


# -- the consumer process of the kill -9 tests ----------------------------


async def _consume(dsn: str, publication: str, slot: str, config: dict[str, Any]) -> None:
    import walex
    from walex.destinations import Deliverer, from_config

    destination = from_config(config)
    async with (
        walex.connect(
            dsn,
            publication=publication,
            slot=slot,
            durable=True,
            max_batch_events=7,
            status_interval=0.2,
        ) as stream,
        Deliverer([destination], retries=None) as deliverer,
    ):
        print("ready", flush=True)
        async for batch in stream:
            await deliverer.handle(batch)


if __name__ == "__main__":
    dsn, publication, slot, config = sys.argv[1:5]
    asyncio.run(_consume(dsn, publication, slot, json.loads(config)))

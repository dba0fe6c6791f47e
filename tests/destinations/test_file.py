"""The file destination, configuration, templates, custom destinations and the
delivery runner's error policy (retry with backoff, stop, skip, dead letter)."""

from __future__ import annotations

import asyncio
import json
import runpy
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

import walex
from tests.fix_pg import Database
from tests.fix_services import make_events
from walex.destinations import (
    Deliverer,
    Destination,
    DestinationError,
    RetryPolicy,
    Route,
    Template,
    deliver,
    from_config,
    send_with_retry,
)
from walex.destinations.file import JsonLines
from walex.errors import ConfigurationError
from walex.events import Event

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(initial=0.01, maximum=0.02)


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the file destination, from a real stream -----------------------------


async def test_changes_arrive_as_json_lines(cdc_db: Database, tmp_path: Path) -> None:
    pub = cdc_db.unique("pub")
    cdc_db.execute("CREATE TABLE acct (id int PRIMARY KEY, balance numeric, tags text[])")
    cdc_db.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE acct")
    out = tmp_path / "changes.jsonl"
    dest = JsonLines(out, fsync=True)
    async with walex.connect(cdc_db.dsn, publication=pub) as stream:
        with cdc_db.connect() as conn:
            conn.execute("INSERT INTO acct VALUES (1, 10.50, '{a,b}')")
            conn.execute("UPDATE acct SET balance = 'NaN' WHERE id = 1")
            conn.execute("DELETE FROM acct WHERE id = 1")
        seen = 0
        async with Deliverer([dest]) as deliverer, asyncio.timeout(20):
            async for batch in stream:
                await deliverer.handle(batch)
                seen += len(batch)
                if seen == 3:
                    break
    ins, upd, dele = read_lines(out)
    assert ins["type"] == "insert"
    assert ins["new_record"] == {"id": 1, "balance": "10.50", "tags": ["a", "b"]}
    assert upd["changes"] == {"balance": ["10.50", "NaN"]}
    assert dele["old_record"] == {"id": 1, "balance": "NaN", "tags": ["a", "b"]}
    assert dele["primary_key"] == {"id": 1}
    assert ins["id"] == f"{ins['commit_lsn']}:0"


async def test_file_appends_and_starts_a_new_line_after_a_torn_one(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    out.write_bytes(b'{"id":"torn by a crash"')
    dest = JsonLines(str(out))
    await dest.start()
    await dest.send(make_events(2))
    await dest.close()
    lines = out.read_text().splitlines()
    assert lines[0] == '{"id":"torn by a crash"'
    assert [json.loads(line)["new_record"]["id"] for line in lines[1:]] == [1, 2]


def test_stdout_gets_one_line_per_event() -> None:
    code = (
        "import asyncio\n"
        "from tests.fix_services import make_events\n"
        "from walex.destinations import from_config\n"
        "async def main():\n"
        "    d = from_config({'type': 'file', 'path': '-'})\n"
        "    await d.start(); await d.send(make_events(3)); await d.close()\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == [0, 1, 2]


# -- configuration --------------------------------------------------------


def test_from_config_makes_each_destination(tmp_path: Path) -> None:
    made = {
        "file": from_config({"type": "file", "path": str(tmp_path / "a"), "fsync": True}),
        "webhook": from_config({"type": "webhook", "url": "https://example.invalid/hook"}),
        "redis": from_config({"type": "redis", "stream": "cdc:{table}", "maxlen": 1000}),
        "nats": from_config({"type": "nats", "subject": "cdc.{table}.{pk}"}),
        "rabbitmq": from_config({"type": "rabbitmq", "routing_key": "{table}.{type}"}),
        "mqtt": from_config({"type": "mqtt", "topic": "cdc/{table}/{pk}"}),
    }
    for kind, dest in made.items():
        assert isinstance(dest, Destination), kind
        assert dest.name == kind


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({}, "either type"),
        ({"type": "kafka"}, "unknown destination type 'kafka'"),
        ({"type": "redis", "stream": "x", "streem": "y"}, r"unknown option\(s\) streem"),
        ({"type": "nats", "subject": "cdc.{tabel}"}, r"unknown field \{tabel\}"),
        ({"type": "nats", "create_stream": True}, "needs the stream's name"),
        ({"type": "webhook", "url": "ftp://x"}, "http:// or https://"),
        ({"type": "webhook", "url": "http://x", "secret": "not base64!"}, "whsec_"),
        ({"class": "walex.events:Event"}, "is not a destination"),
        ({"class": "nowhere.at.all:Thing"}, "cannot import nowhere"),
        ({"class": "no_colon"}, "package.module:ClassName"),
    ],
)
def test_bad_configuration_says_what_to_change(section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        from_config(section)


@pytest.mark.parametrize(
    ("kind", "module"),
    [
        ("webhook", "httpx"),
        ("redis", "redis"),
        ("nats", "nats"),
        ("rabbitmq", "aio_pika"),
        ("mqtt", "aiomqtt"),
    ],
)
def test_missing_client_library_gives_the_install_line(kind: str, module: str) -> None:
    # A fresh interpreter where the client cannot be imported.
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"
        "from walex.destinations import from_config\n"
        "from walex.errors import ConfigurationError\n"
        "try:\n"
        f"    from_config({{'type': {kind!r}, 'url': 'http://x'}} if {kind!r} == 'webhook'"
        f" else {{'type': {kind!r}}})\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert f'pip install "walex[{kind}]"' in result.stdout


def test_template_partitions_by_primary_key() -> None:
    (event,) = make_events(1, table="order.lines")
    assert Template("cdc.{schema}.{table}.{pk}").render(event) == "cdc.public.order.lines.1"
    escaped = Template("cdc.{table}.{type}", escape=lambda s: s.replace(".", "_"))
    assert escaped.render(event) == "cdc.order_lines.insert"
    assert Template("fixed").render(event) == "fixed"
    assert event.source is not None
    composite = event._replace(source=replace(event.source, primary_key=("id", "v")))
    assert Template("{table}.{pk}").render(composite) == "order.lines.1_0"
    assert Template("{pk}", pk_separator=":").render(composite) == "1:0"
    message = event._replace(type="message", source=None, new_record=None)
    assert Template("cdc.{schema}.{table}.{type}.{pk}").render(message) == "cdc._._.message._"


# -- a custom destination: the documented example -------------------------


async def test_custom_destination_example_runs(cdc_db: Database) -> None:
    module = runpy.run_path(str(ROOT / "examples" / "destinations" / "custom.py"))
    dest = module["PrintToLog"](prefix="cdc")
    assert isinstance(dest, Destination)
    pub = cdc_db.unique("pub")
    cdc_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(cdc_db.dsn, publication=pub) as stream:
        cdc_db.execute("INSERT INTO t VALUES (1)")
        async with Deliverer([dest]) as deliverer, asyncio.timeout(20):
            async for batch in stream:
                await deliverer.handle(batch)
                break
    assert dest.lines == ['cdc public.t insert {"id": 1}']


# -- the runner's error policy --------------------------------------------


class Flaky:
    """Fails as told, then accepts; records what it accepted."""

    def __init__(self, errors: Sequence[BaseException] = (), name: str = "flaky") -> None:
        self.name = name
        self.errors = list(errors)
        self.accepted: list[str] = []
        self.calls = 0
        self.started = self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def send(self, events: Sequence[Event]) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.accepted += [e.id for e in events]

    async def close(self) -> None:
        self.closed += 1


async def test_retries_with_backoff_then_delivers() -> None:
    events = make_events(3)
    dest = Flaky([DestinationError("down"), ConnectionResetError("reset")])
    async with Deliverer([Route(dest, policy=FAST)]) as deliverer:
        await deliverer.handle(events)
    assert dest.calls == 3
    assert dest.accepted == [e.id for e in events]
    assert (dest.started, dest.closed) == (1, 1)


async def test_retry_after_sets_the_delay() -> None:
    dest = Flaky([DestinationError("busy", retry_after=0.3)])
    async with Deliverer([Route(dest, policy=FAST)]) as deliverer:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await deliverer.handle(make_events(1))
        assert loop.time() - started >= 0.3


async def test_only_the_failed_tail_is_sent_again() -> None:
    events = make_events(4)
    dest = Flaky([DestinationError("cut", failed=events[2:])])
    async with Deliverer([Route(dest, policy=FAST)]) as deliverer:
        await deliverer.handle(events)
    assert dest.accepted == [e.id for e in events[2:]]
    assert deliverer.routes[0].delivered == 4


async def test_stop_raises_after_the_retries() -> None:
    dest = Flaky([DestinationError("down")] * 3)
    async with Deliverer([Route(dest, retries=2, policy=FAST)]) as deliverer:
        with pytest.raises(DestinationError, match="down"):
            await deliverer.handle(make_events(1))
    assert dest.calls == 3


async def test_not_retryable_stops_at_once() -> None:
    dest = Flaky([DestinationError("400", retryable=False)])
    async with Deliverer([Route(dest, policy=FAST)]) as deliverer:
        with pytest.raises(DestinationError, match="400"):
            await deliverer.handle(make_events(1))
    assert dest.calls == 1


async def test_skip_goes_on() -> None:
    dest = Flaky([DestinationError("bad", retryable=False)])
    async with Deliverer([Route(dest, on_error="skip", policy=FAST)]) as deliverer:
        await deliverer.handle(make_events(2))
        await deliverer.handle(make_events(1, start=10))
    assert deliverer.routes[0].skipped == 2
    assert len(dest.accepted) == 1


async def test_dead_letter_takes_only_the_rejected_events(tmp_path: Path) -> None:
    events = make_events(3)
    dest = Flaky(
        [DestinationError("422", retryable=False, failed=events[1:], rejected=events[1:2])]
    )
    dead = JsonLines(tmp_path / "dead.jsonl", name="dead")
    route = Route(dest, on_error="dead_letter", dead_letter=dead, policy=FAST)
    async with Deliverer([route]) as deliverer:
        await deliverer.handle(events)
    assert [d["id"] for d in read_lines(tmp_path / "dead.jsonl")] == [events[1].id]
    assert dest.accepted == [events[2].id]
    assert (route.delivered, route.dead_lettered) == (2, 1)


async def test_routes_choose_tables_and_types() -> None:
    orders, items = Flaky(name="orders"), Flaky(name="items")
    events = make_events(2, table="orders") + make_events(2, table="order_items", start=5)
    deliverer = Deliverer(
        [
            Route(orders, tables=["public.orders"]),
            Route(items, tables=["order_*"], types=["insert"]),
        ]
    )
    async with deliverer:
        await deliverer.handle(events)
    assert orders.accepted == [e.id for e in events[:2]]
    assert items.accepted == [e.id for e in events[2:]]
    with pytest.raises(ConfigurationError, match="unknown event type"):
        Route(orders, types=["upsert"])
    with pytest.raises(ConfigurationError, match="dead_letter destination"):
        Route(orders, on_error="dead_letter")


async def test_a_failing_destination_confirms_nothing(cdc_db: Database) -> None:
    """on_error="stop": the stream is left by the exception, the batch replays."""
    pub, slot = cdc_db.unique("pub"), cdc_db.unique("slot")
    cdc_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(cdc_db.dsn, publication=pub, slot=slot, durable=True):
        pass
    cdc_db.execute("INSERT INTO t VALUES (1)")
    broken = Flaky([DestinationError("down", retryable=False)])

    async def run_broken() -> None:
        async with (
            walex.connect(cdc_db.dsn, publication=pub, slot=slot, durable=True) as stream,
            asyncio.timeout(20),
        ):
            await deliver(stream, [broken])

    with pytest.raises(DestinationError):
        await run_broken()
    working = Flaky()
    async with (
        walex.connect(cdc_db.dsn, publication=pub, slot=slot, durable=True) as stream,
        Deliverer([working]) as deliverer,
        asyncio.timeout(20),
    ):
        async for batch in stream:
            await deliverer.handle(batch)
            break
    assert len(working.accepted) == 1


async def test_send_with_retry_hands_what_it_gives_up_to_the_caller() -> None:
    events = make_events(3)
    dest = Flaky(
        [
            DestinationError("busy", retry_after=0.01),
            DestinationError("refused", retryable=False, failed=events[1:], rejected=events[1:2]),
        ]
    )
    given_up: list[tuple[list[str], str]] = []

    async def on_give_up(failed: Sequence[Event], error: DestinationError) -> None:
        given_up.append(([e.id for e in failed], str(error)))

    accepted = await send_with_retry(dest, events, FAST, on_give_up=on_give_up)
    # The refusal said events[0] was accepted (failed = the rest); events[2]
    # went in a call of its own.
    assert accepted == 2
    assert given_up == [([events[1].id], "refused")]
    assert dest.accepted == [events[2].id]
    assert dest.calls == 3


async def test_a_stop_during_a_retry_wait_returns_at_once_unconfirmed(cdc_db: Database) -> None:
    """deliver(stop=...) does not sleep out a retry delay during an outage: it
    returns at once, and the transaction in hand comes again."""
    pub, slot = cdc_db.unique("pub"), cdc_db.unique("slot")
    cdc_db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(cdc_db.dsn, publication=pub, slot=slot, durable=True):
        pass
    cdc_db.execute("INSERT INTO t VALUES (1)")
    down = Flaky([DestinationError("broker away")] * 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    asked: list[float] = []

    async def stop_after_the_first_try() -> None:
        while not down.calls:  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.01)
        asked.append(loop.time())
        stop.set()

    stopper = asyncio.ensure_future(stop_after_the_first_try())
    async with (
        walex.connect(cdc_db.dsn, publication=pub, slot=slot, durable=True) as stream,
        asyncio.timeout(20),
    ):
        await deliver(
            stream, [down], retries=100000, policy=RetryPolicy(initial=30, maximum=30), stop=stop
        )
        stopped = loop.time()
    await stopper
    assert down.calls == 1
    assert stopped - asked[0] < 2
    working = Flaky()
    async with (
        walex.connect(cdc_db.dsn, publication=pub, slot=slot, durable=True) as stream,
        Deliverer([working]) as deliverer,
        asyncio.timeout(20),
    ):
        async for batch in stream:
            await deliverer.handle(batch)
            break
    assert len(working.accepted) == 1

"""The WalEx app end to end against a real Postgres: handlers, filters, policies, running."""

from __future__ import annotations

import asyncio
import itertools
import json
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import walex
from tests.fix_pg import Database
from tests.helpers import confirmed_flush, make_app, seed_tables, until
from walex import Event, WalEx
from walex.app import DeadLetter, serve
from walex.errors import ConfigurationError, HandlerError, PublicationNotFound
from walex.lsn import LSN


def ids(events: Sequence[Event]) -> list[Any]:
    return [(e.record or {}).get("id") for e in events]


async def test_handlers_get_their_tables_and_types_in_commit_order(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub, subscriptions=["user_account", "todo"])
    seen: list[tuple[str, str, list[Any]]] = []

    def record(label: str) -> Callable[[list[Event]], None]:
        def handler(events: list[Event]) -> None:
            seen.append((label, events[0].type, ids(events)))

        handler.__qualname__ = label
        return handler

    app.on_insert("user_account")(record("ins_user"))
    app.on_update("public.todo")(record("upd_todo"))
    app.on_delete("todo")(record("del_todo"))
    app.on_truncate("todo")(record("trunc_todo"))

    everything: list[Event] = []

    @app.on_event("*")
    async def all_changes(events: list[Event]) -> None:
        everything.extend(events)

    messages: list[Event] = []

    @app.on_message(prefix="outbox")
    async def outbox(events: list[Event]) -> None:
        messages.extend(events)

    async with app:
        with db.connect() as conn, conn.transaction():
            conn.execute("INSERT INTO user_account (id, email) VALUES (2, 'b'), (1, 'a')")
            conn.execute("INSERT INTO todo (id, title) VALUES (10, 'x'), (11, 'y')")
            conn.execute("UPDATE todo SET status = 'done' WHERE id = 11")
            conn.execute("SELECT pg_logical_emit_message(true, 'outbox', 'hello')")
            conn.execute("SELECT pg_logical_emit_message(true, 'other', 'ignored')")
        db.execute("DELETE FROM todo WHERE id = 10")
        db.execute("TRUNCATE todo")
        await until(lambda: any(s[0] == "trunc_todo" for s in seen), what="the truncate")
    assert seen == [
        ("ins_user", "insert", [2, 1]),
        ("upd_todo", "update", [11]),
        ("del_todo", "delete", [10]),
        ("trunc_todo", "truncate", [None]),
    ]
    # A wildcard handler gets every change of a batch, across tables, in order.
    assert [(e.table, e.type) for e in everything] == [
        ("user_account", "insert"),
        ("user_account", "insert"),
        ("todo", "insert"),
        ("todo", "insert"),
        ("todo", "update"),
        ("todo", "delete"),
        ("todo", "truncate"),
    ]
    assert [e.seq for e in everything[:5]] == [0, 1, 2, 3, 4]
    assert [(m.prefix, m.content) for m in messages] == [("outbox", b"hello")]


async def test_subscriptions_limit_what_handlers_see(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub, subscriptions=["todo"])
    got: list[Event] = []
    app.on_event("*")(got.extend)
    with pytest.raises(walex.errors.ConfigurationError, match="not in subscriptions"):
        app.on_insert("user_account")(got.extend)
    async with app:
        db.execute("INSERT INTO user_account (id) VALUES (1)")
        db.execute("INSERT INTO todo (id) VALUES (1)")
        await until(lambda: len(got) >= 1)
    assert [e.table for e in got] == ["todo"]


async def test_one_event_handlers_sync_handlers_and_registration_order(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub)
    order: list[tuple[str, Any]] = []
    threads: set[int] = set()

    @app.on_insert("todo")
    def first(event: Event) -> None:  # one event at a time, in a worker thread
        threads.add(threading.get_ident())
        order.append(("first", (event.new_record or {})["id"]))

    @app.on_insert("todo")
    async def second(events: list[Event]) -> None:
        order.append(("second", ids(events)))

    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1), (2)")
        await until(lambda: len(order) >= 3)
    assert order == [("first", 1), ("first", 2), ("second", [1, 2])]
    assert threading.get_ident() not in threads


async def test_filters_and_record_shaping(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub)
    watched: list[Event] = []
    shaped: list[Event] = []
    full: list[Event] = []

    @app.on_update(
        "todo",
        unwatched_fields={"updated_at"},
        unwatched_records={"status": "archived"},
        where=lambda e: (e.new_record or {}).get("id") != 99,
    )
    async def todo_changed(events: list[Event]) -> None:
        watched.extend(events)

    @app.on_insert("user_account", exclude_columns={"email"})
    async def no_email(events: list[Event]) -> None:
        shaped.extend(events)

    @app.on_insert("user_account", columns=["id"])
    async def only_id(events: list[Event]) -> None:
        shaped.extend(events)

    @app.on_insert("user_account")
    async def unshaped(events: list[Event]) -> None:
        full.extend(events)

    async with app:
        db.execute("INSERT INTO todo (id, title) VALUES (1, 'a'), (2, 'b'), (99, 'c')")
        db.execute("UPDATE todo SET updated_at = now() + interval '1 hour' WHERE id = 1")
        db.execute("UPDATE todo SET status = 'archived', title = 'old' WHERE id = 2")
        db.execute("UPDATE todo SET title = 'new' WHERE id = 99")
        db.execute("UPDATE todo SET title = 'kept' WHERE id = 1")
        db.execute("INSERT INTO user_account (id, email, name) VALUES (5, 'e@x', 'eve')")
        await until(lambda: len(full) == 1 and len(shaped) == 2)
        await asyncio.sleep(0.1)
    assert [(e.new_record or {})["title"] for e in watched] == ["kept"]
    no_email_rec, only_id_rec = (e.new_record for e in shaped)
    assert no_email_rec is not None
    assert set(no_email_rec) == {"id", "name", "updated_at"}
    assert only_id_rec == {"id": 5}
    # Shaping made new records; the other handler's event is whole.
    assert full[0].new_record is not None
    assert full[0].new_record["email"] == "e@x"


async def test_functions_pipeline_runs_after_the_handler_per_event(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub)
    trail: list[str] = []

    async def audit(event: Event) -> None:
        trail.append(f"audit {(event.new_record or {})['id']}")

    def notify(event: Event) -> None:
        trail.append(f"notify {(event.new_record or {})['id']}")

    @app.on_insert("todo", functions=[audit, notify])
    async def handler(events: list[Event]) -> None:
        trail.append(f"handler {ids(events)}")

    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1), (2)")
        await until(lambda: len(trail) >= 5)
    assert trail == ["handler [1, 2]", "audit 1", "audit 2", "notify 1", "notify 2"]


async def test_stop_policy_stops_the_app_and_redelivers_after_restart(db: Database) -> None:
    pub = seed_tables(db)
    name = db.unique("app")
    app = make_app(db, pub, name=name, retries=2)
    attempts: list[str] = []

    @app.on_insert("todo")
    async def fails(events: list[Event]) -> None:
        attempts.extend(e.id for e in events)
        raise RuntimeError("boom")

    await app.start()
    db.execute("INSERT INTO todo (id) VALUES (1)")
    with pytest.raises(HandlerError, match="boom") as info:
        async with asyncio.timeout(15):
            await app.wait()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not app.running
    assert len(attempts) == 3  # one try and two retries
    assert len(set(attempts)) == 1
    commit_lsn = LSN.parse(attempts[0].split(":")[0])
    assert confirmed_flush(db, app.settings.slot_name) <= commit_lsn

    again = make_app(db, pub, name=name)
    got: list[Event] = []
    again.on_insert("todo")(got.extend)
    async with again:
        await until(lambda: len(got) >= 1)
    assert [e.id for e in got] == [attempts[0]]


async def test_retries_with_backoff_then_success(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub, retries=3, retry_delay=0.05)
    stamps: list[float] = []

    @app.on_insert("todo")
    def flaky(events: list[Event]) -> None:
        stamps.append(time.monotonic())
        if len(stamps) < 3:
            raise ConnectionError("try again")

    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1)")
        await until(lambda: len(stamps) >= 3)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1  # doubled
    assert app.error is None


async def test_skip_policy_confirms_and_goes_on(db: Database) -> None:
    pub = seed_tables(db)
    name = db.unique("app")
    app = make_app(db, pub, name=name, on_error="skip", retries=0)
    good: list[Event] = []

    @app.on_insert("todo")
    async def picky(events: list[Event]) -> None:
        if ids(events) == [1]:
            raise ValueError("bad row")
        good.extend(events)

    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1)")
        db.execute("INSERT INTO todo (id) VALUES (2)")
        await until(lambda: len(good) >= 1)
    assert ids(good) == [2]
    # Skipped means confirmed: a restart starts after both.
    again = make_app(db, pub, name=name)
    got: list[Event] = []
    again.on_insert("todo")(got.extend)
    async with again:
        db.execute("INSERT INTO todo (id) VALUES (3)")
        await until(lambda: len(got) >= 1)
    assert ids(got) == [3]


async def test_dead_letter_file_and_callable(db: Database, tmp_path: Path) -> None:
    pub = seed_tables(db)
    path = tmp_path / "dead.jsonl"
    app = make_app(db, pub, on_error="dead_letter", dead_letter=path, retries=1)
    letters: list[DeadLetter] = []

    async def to_list(letter: DeadLetter) -> None:
        letters.append(letter)

    after: list[Event] = []

    @app.on_insert("todo")
    async def broken(events: list[Event]) -> None:
        raise KeyError("no such thing")

    @app.on_insert("todo")
    async def later(events: list[Event]) -> None:
        after.extend(events)

    async with app:
        db.execute("INSERT INTO todo (id, title) VALUES (7, 'seven')")
        await until(lambda: len(after) >= 1)
    (line,) = path.read_text().splitlines()
    letter = json.loads(line)
    assert letter["handler"].endswith("broken")
    assert letter["attempts"] == 2
    assert letter["error"]["type"] == "KeyError"
    assert [e["new_record"]["title"] for e in letter["events"]] == ["seven"]
    assert letter["events"][0]["id"] == after[0].id

    app2 = make_app(db, pub, on_error="dead_letter", dead_letter=to_list, retries=0)
    app2.on_delete("todo")(broken)
    async with app2:
        db.execute("DELETE FROM todo WHERE id = 7")
        await until(lambda: len(letters) >= 1)
    assert letters[0].events[0].type == "delete"
    assert isinstance(letters[0].error, KeyError)


async def test_a_failing_dead_letter_sink_stops_the_app(db: Database) -> None:
    pub = seed_tables(db)

    def sink(letter: DeadLetter) -> None:
        raise OSError("disk full")

    app = make_app(db, pub, on_error="dead_letter", dead_letter=sink, retries=0)

    @app.on_insert("todo")
    async def broken(events: list[Event]) -> None:
        raise RuntimeError("x")

    await app.start()
    db.execute("INSERT INTO todo (id) VALUES (1)")
    with pytest.raises(HandlerError, match="dead letter could not be written"):
        async with asyncio.timeout(15):
            await app.wait()


async def test_graceful_stop_lets_the_handler_finish_and_confirms_it(db: Database) -> None:
    pub = seed_tables(db)
    name = db.unique("app")
    app = make_app(db, pub, name=name)
    started = asyncio.Event()
    finished: list[Any] = []

    @app.on_insert("todo")
    async def slow(events: list[Event]) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.extend(ids(events))

    await app.start()
    db.execute("INSERT INTO todo (id) VALUES (1)")
    async with asyncio.timeout(15):
        await started.wait()
        await app.stop()
    assert finished == [1]
    again = make_app(db, pub, name=name)
    got: list[Event] = []
    again.on_insert("todo")(got.extend)
    async with again:
        db.execute("INSERT INTO todo (id) VALUES (2)")
        await until(lambda: len(got) >= 1)
    assert ids(got) == [2]


async def test_stop_while_waiting_to_retry_confirms_nothing(db: Database) -> None:
    pub = seed_tables(db)
    name = db.unique("app")
    app = make_app(db, pub, name=name, retries=5, retry_delay=30)
    tried = asyncio.Event()

    @app.on_insert("todo")
    async def down(events: list[Event]) -> None:
        tried.set()
        raise ConnectionError("service down")

    await app.start()
    db.execute("INSERT INTO todo (id) VALUES (1)")
    async with asyncio.timeout(10):
        await tried.wait()
        await app.stop()  # does not wait the 30 s out
    again = make_app(db, pub, name=name)
    got: list[Event] = []
    again.on_insert("todo")(got.extend)
    async with again:
        await until(lambda: len(got) >= 1)
    assert ids(got) == [1]


class MemoryDestination:
    """An in-memory destination: what the app's routing hands over, and when."""

    def __init__(self, name: str, fail_times: int = 0) -> None:
        self.name = name
        self.sent: list[list[Event]] = []
        self.fail_times = fail_times
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def send(self, events: Sequence[Event]) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("broker away")
        self.sent.append(list(events))

    async def close(self) -> None:
        self.closed = True


async def test_destinations_get_matching_events_in_order(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub)
    everything = MemoryDestination("all", fail_times=1)
    todos = MemoryDestination("todos")
    app.add_destination(everything)
    app.add_destination(todos, tables=["todo"], types=["insert", "delete"])
    async with app:
        assert everything.started
        assert todos.started
        with db.connect() as conn, conn.transaction():
            conn.execute("INSERT INTO todo (id) VALUES (1), (2)")
            conn.execute("INSERT INTO user_account (id) VALUES (1)")
            conn.execute("UPDATE todo SET title = 't' WHERE id = 1")
            conn.execute("SELECT pg_logical_emit_message(true, 'p', 'm')")
        db.execute("DELETE FROM todo WHERE id = 2")
        # Transactions may travel together in one send (pipelined delivery):
        # what counts is every event, once each send succeeded, in order.
        await until(lambda: sum(map(len, todos.sent)) >= 3 and sum(map(len, everything.sent)) >= 6)
    assert everything.closed
    assert todos.closed
    delivered = [e for b in everything.sent for e in b]
    assert [(e.table, e.type) for e in delivered] == [
        ("todo", "insert"),
        ("todo", "insert"),
        ("user_account", "insert"),
        ("todo", "update"),
        (None, "message"),
        ("todo", "delete"),
    ]
    assert [(e.type, ids([e])[0]) for b in todos.sent for e in b] == [
        ("insert", 1),
        ("insert", 2),
        ("delete", 2),
    ]


async def test_observers_are_told_and_cannot_break_the_app(db: Database) -> None:
    pub = seed_tables(db)
    calls: list[tuple[Any, ...]] = []

    class Metrics:
        def on_batch(self, batch: walex.Batch, seconds: float) -> None:
            calls.append(("batch", len(batch), seconds >= 0))

        def on_handler(
            self, name: str, table: str, kind: str, seconds: float, error: BaseException | None
        ) -> None:
            calls.append(("handler", name.rsplit(":", 1)[-1], table, kind, type(error).__name__))

    class Broken:
        def on_batch(self, batch: walex.Batch, seconds: float) -> None:
            raise RuntimeError("observer bug")

    streams: list[tuple[str, walex.Stream]] = []

    class Health:
        def track_stream(self, stream: walex.Stream) -> None:
            streams.append(("track", stream))

        def untrack_stream(self, stream: walex.Stream) -> None:
            streams.append(("untrack", stream))

    app = make_app(db, pub, observers=[Broken(), Metrics(), Health()], retries=1)
    done: list[Event] = []

    @app.on_insert("todo")
    async def once_failing(events: list[Event]) -> None:
        if not done:
            done.append(events[0])
            raise ValueError("first time")

    async with app:
        assert app.stream is not None
        assert streams == [("track", app.stream)]
        assert app.stream.connected
        db.execute("INSERT INTO todo (id) VALUES (1)")
        await until(lambda: any(c[0] == "batch" for c in calls))
    assert app.stream is None
    assert [kind for kind, _ in streams] == ["track", "untrack"]
    assert streams[0][1] is streams[1][1]
    assert calls == [
        (
            "handler",
            "test_observers_are_told_and_cannot_break_the_app.<locals>.once_failing",
            "public.todo",
            "insert",
            "ValueError",
        ),
        (
            "handler",
            "test_observers_are_told_and_cannot_break_the_app.<locals>.once_failing",
            "public.todo",
            "insert",
            "NoneType",
        ),
        ("batch", 1, True),
    ]


async def test_several_apps_one_failing_does_not_stop_the_others(db: Database) -> None:
    pub = seed_tables(db)
    ok = make_app(db, pub)
    bad = make_app(db, pub)
    got: list[Event] = []
    ok.on_insert("todo")(got.extend)

    @bad.on_insert("todo")
    async def fails(events: list[Event]) -> None:
        raise RuntimeError("bad app")

    runner = asyncio.create_task(serve(ok, bad, signals=False))
    await until(lambda: ok.running and bad.running)
    db.execute("INSERT INTO todo (id) VALUES (1)")
    await until(lambda: not bad.running and len(got) >= 1)
    assert ok.running
    db.execute("INSERT INTO todo (id) VALUES (2)")
    await until(lambda: len(got) >= 2)
    ok.request_stop()
    with pytest.raises(HandlerError, match="bad app"):
        async with asyncio.timeout(15):
            await runner
    assert not ok.running


async def test_stop_all_on_error(db: Database) -> None:
    pub = seed_tables(db)
    ok, bad = make_app(db, pub), make_app(db, pub, retries=0)
    ok.on_insert("todo")(lambda events: None)

    @bad.on_insert("todo")
    async def fails(events: list[Event]) -> None:
        raise RuntimeError("bad app")

    runner = asyncio.create_task(serve(ok, bad, stop_all_on_error=True, signals=False))
    await until(lambda: ok.running and bad.running)
    db.execute("INSERT INTO todo (id) VALUES (1)")
    with pytest.raises(HandlerError):
        async with asyncio.timeout(15):
            await runner
    assert not ok.running


async def test_server_errors_surface_at_start(db: Database) -> None:
    app = WalEx(name=db.unique("app"), url=db.dsn, publication="nope")
    with pytest.raises(PublicationNotFound):
        await app.start()
    assert not app.running


async def test_a_pattern_that_matches_no_published_table_is_an_error_at_start(
    db: Database,
) -> None:
    pub = seed_tables(db)  # user_account and todo
    db.execute("CREATE TABLE order_items (id int PRIMARY KEY)")  # not in the publication
    app = make_app(db, pub)
    app.on_insert("order_*", name="orders")(print)
    app.on_insert("*")(print)  # "*" is never an error
    app.on_event("user_*")(print)  # a pattern that matches is fine
    with pytest.raises(ConfigurationError) as info:
        await app.start()
    message = str(info.value)
    setup = shlex.join(
        ["walex", "setup", app.settings.safe_conninfo, "--publication", pub, "--table"]
    )
    assert (
        f"handler orders: table pattern 'public.order_*' matches no table of publication "
        f"'{pub}'; add it with: {setup} public.order_items"
    ) in message
    assert "user_" not in message
    assert not app.running
    assert not db.fetch(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (app.settings.slot_name,)
    )

    other = make_app(db, pub, subscriptions=["todo", "invoice_*", "order_items"])
    other.add_destination(MemoryDestination("mem"), tables=["todo", "order_items"])
    other.on_insert("user_*", name="users")(print)
    with pytest.raises(ConfigurationError) as info:
        await other.start()
    lines = str(info.value).splitlines()[1:]
    assert lines[0].startswith(
        "- subscriptions: table pattern 'public.invoice_*' matches no table of publication "
        f"'{pub}', nor any table of the database: correct the pattern"
    )
    assert lines[1] == (
        "- subscriptions: table pattern 'public.order_items' matches no table of publication "
        f"'{pub}'; add it with: {setup} public.order_items"
    )
    assert lines[2] == (
        "- destination mem: table pattern 'public.order_items' matches no table of publication "
        f"'{pub}'; add it with: {setup} public.order_items"
    )
    assert lines[3] == (
        f"- handler users: table pattern 'public.user_*' matches public.user_account of "
        f"publication '{pub}', which subscriptions (todo, invoice_*, order_items) leave out: "
        "add it there"
    )


async def test_message_middleware_sees_every_batch_first_and_can_hold_the_flow(
    db: Database,
) -> None:
    pub = seed_tables(db)
    trail: list[str] = []
    gate = asyncio.Event()

    async def middleware(batch: walex.Batch) -> None:
        trail.append(f"middleware {len(batch)}")
        await gate.wait()  # back-pressure: nothing else is read meanwhile

    app = make_app(db, pub, message_middleware=middleware)

    @app.on_insert("todo")
    async def handler(events: list[Event]) -> None:
        trail.append(f"handler {ids(events)}")

    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1), (2)")
        db.execute("INSERT INTO todo (id) VALUES (3)")
        await until(lambda: len(trail) >= 1)
        await asyncio.sleep(0.2)
        assert trail == ["middleware 2"]
        gate.set()
        await until(lambda: len(trail) >= 4)
    assert trail == ["middleware 2", "handler [1, 2]", "middleware 1", "handler [3]"]

    def broken(batch: walex.Batch) -> None:
        raise RuntimeError("middleware bug")

    failing = make_app(db, pub, message_middleware=broken)
    await failing.start()
    db.execute("INSERT INTO todo (id) VALUES (4)")
    with pytest.raises(HandlerError, match="middleware bug"):
        async with asyncio.timeout(15):
            await failing.wait()


async def test_second_app_on_a_durable_slot_waits_and_takes_over(db: Database) -> None:
    pub = seed_tables(db)
    name = db.unique("app")
    first = make_app(db, pub, name=name)
    second = make_app(db, pub, name=name, standby_retry=0.1)
    got1: list[Event] = []
    got2: list[Event] = []
    first.on_insert("todo")(got1.extend)
    second.on_insert("todo")(got2.extend)
    await first.start()
    standby = asyncio.create_task(second.start())
    try:
        db.execute("INSERT INTO todo (id) VALUES (1)")
        await until(lambda: len(got1) >= 1)
        assert not standby.done()  # waiting while the slot is active elsewhere
        await first.stop()
        async with asyncio.timeout(15):
            await standby
        db.execute("INSERT INTO todo (id) VALUES (2)")
        await until(lambda: len(got2) >= 1)
    finally:
        if standby.done() and second.running:
            await second.stop()
        else:
            standby.cancel()
    assert ids(got1) == [1]
    assert ids(got2) == [2]


class RefusingDestination:
    """Refuses the events whose id is in *refuse* for good (like a webhook's 422),
    and fails the first send of *flaky* with a Retry-After."""

    def __init__(self, name: str, refuse: set[int], retry_after: float | None = None) -> None:
        self.name = name
        self.refuse = refuse
        self.retry_after = retry_after
        self.attempts = 0
        self.accepted: list[Any] = []
        self.sends: list[float] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, events: Sequence[Event]) -> None:
        from walex.destinations import DestinationError

        self.attempts += 1
        self.sends.append(time.monotonic())
        if self.retry_after is not None and self.attempts == 1:
            raise DestinationError("busy", retry_after=self.retry_after)
        for i, event in enumerate(events):
            if ids([event])[0] in self.refuse:
                self.accepted.extend(ids(events[:i]))
                raise DestinationError(
                    "refused", retryable=False, failed=events[i:], rejected=[event]
                )
        self.accepted.extend(ids(events))


async def test_destination_refusals_are_not_retried_and_only_the_rest_is_resent(
    db: Database, tmp_path: Path
) -> None:
    pub = seed_tables(db)
    letters = tmp_path / "dead.jsonl"
    app = make_app(db, pub, on_error="dead_letter", dead_letter=letters, retries=5)
    dest = RefusingDestination("picky", refuse={2})
    app.add_destination(dest)
    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1), (2), (3)")
        await until(lambda: 3 in dest.accepted)
    # 1 went through; 2 was refused for good (no retry) and dead-lettered;
    # only 3 was sent again.
    assert dest.accepted == [1, 3]
    assert dest.attempts == 2
    (letter,) = [json.loads(line) for line in letters.read_text().splitlines()]
    assert [e["new_record"]["id"] for e in letter["events"]] == [2]
    assert letter["attempts"] == 1  # tried once, not retries + 1


async def test_destination_retry_after_is_honoured(db: Database) -> None:
    pub = seed_tables(db)
    app = make_app(db, pub, retries=3)
    dest = RefusingDestination("busy", refuse=set(), retry_after=0.5)
    app.add_destination(dest)
    async with app:
        db.execute("INSERT INTO todo (id) VALUES (1)")
        await until(lambda: dest.accepted == [1])
    assert dest.attempts == 2
    assert dest.sends[1] - dest.sends[0] >= 0.45

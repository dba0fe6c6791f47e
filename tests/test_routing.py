"""walex.routing on its own: patterns, route selection and filters, the retry
policy, each error policy, and a stop during a retry wait.

These test walex's own logic, so the targets are fakes: plain functions and
an in-memory destination; no Postgres, no broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from walex import Event
from walex.errors import ConfigurationError, DestinationError, HandlerError
from walex.names import parse_pattern
from walex.routing import (
    ALL_TYPES,
    Abandoned,
    DeadLetter,
    Destination,
    Dispatcher,
    Pipeline,
    RetryPolicy,
    Route,
    send_with_retry,
    unmatched_patterns,
)
from walex.testing import make_batch, make_delete, make_insert, make_message, make_update

FAST = RetryPolicy(initial=0.001, maximum=0.002)
SLOW = RetryPolicy(initial=30, maximum=30)


def rows(*tables: str) -> list[Event]:
    """One insert per table name, in one transaction."""
    return make_batch(*(make_insert(t, {"id": i}) for i, t in enumerate(tables))).events


class Memory:
    """A destination that keeps what it gets; fails with *errors* first."""

    def __init__(self, name: str = "memory", errors: Sequence[BaseException] = ()) -> None:
        self.name = name
        self.errors = list(errors)
        self.sent: list[list[Event]] = []
        self.calls = 0
        self.started = self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def send(self, events: Sequence[Event]) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append(list(events))

    async def close(self) -> None:
        self.closed += 1

    @property
    def tables(self) -> list[str | None]:
        return [e.table for batch in self.sent for e in batch]


class Recorder:
    """A handler (list of events) that fails *fails* times, then records."""

    def __init__(self, fails: int = 0, error: Exception | None = None) -> None:
        self.fails = fails
        self.error = error or ConnectionError("down")
        self.calls = 0
        self.got: list[Event] = []

    async def __call__(self, events: list[Event]) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        self.got.extend(events)


# -- patterns: the one grammar ------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "table", "hit"),
    [
        ("order_*", "public.order_items", True),
        ("order_*", "public.orders", False),
        ("order_*", "app.order_items", False),
        ("public.order_?", "public.order_x", True),
        ("app.*", "app.anything", True),
        ("app.*", "public.anything", False),
        ("*.audit", "billing.audit", True),
        ("*", "any.thing", True),
        ("todo", "public.todo", True),
        ("todo", "app.todo", False),
        ("app:todo", "app.todo", True),
        ('"order_*"', "public.order_items", False),  # quoted: a literal name
        ('"order_*"', "public.order_*", True),
        ('"Odd.Name"', "public.Odd.Name", True),
    ],
)
def test_route_patterns_are_the_names_grammar(pattern: str, table: str, hit: bool) -> None:
    schema, _, name = table.partition(".")
    route = Route(print, tables=pattern)
    assert route.wants_table(schema, name) is hit
    # The same answer as the grammar's own matcher: one grammar, not two.
    assert parse_pattern(pattern).matches(schema, name) is hit


def test_bad_patterns_and_arguments_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match=r"h: table: .*more than one dot"):
        Route(print, name="h", tables="a.b.c")
    with pytest.raises(ConfigurationError, match="unknown event type"):
        Route(print, types=["upsert"])
    with pytest.raises(ConfigurationError, match="on_error must be"):
        Route(print, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="dead_letter destination"):
        Route(Memory(), on_error="dead_letter")
    with pytest.raises(ConfigurationError, match="columns or exclude_columns"):
        Route(print, columns=["a"], exclude_columns=["b"])
    with pytest.raises(ConfigurationError, match="at least one table pattern"):
        Route(print, tables=[], types=["insert"])
    with pytest.raises(ConfigurationError, match=r"a handler .* or a destination"):
        Route(42)  # type: ignore[arg-type]


# -- route selection and filters ---------------------------------------------------


def test_a_route_selects_by_type_and_table() -> None:
    events = rows("orders", "order_items", "customers")
    route = Route(print, tables=["order_*", "customers"], types={"insert"})
    assert [e.table for e in route.select(events)] == ["order_items", "customers"]
    assert Route(print, tables="*", types={"delete"}).select(events) == []
    assert [route.matches(e) for e in events] == [False, True, True]


def test_messages_go_to_routes_on_every_table_or_on_messages_alone() -> None:
    message = make_message("outbox", b"hi")
    other = make_message("other", b"x")
    assert Route(print, tables="*").select([message]) == [message]
    assert Route(print, tables="public.*").select([message]) == []
    assert Route(print, tables=[], types={"message"}, prefix="outbox").select([message, other]) == [
        message
    ]
    # A table-change route does not get messages, whatever its tables.
    assert Route(print, tables="*", types={"insert"}).select([message]) == []
    assert Route(print).types == ALL_TYPES


def test_filters_and_shaping_are_per_route() -> None:
    touch = make_update("todo", {"id": 1, "at": 1, "s": "a"}, {"id": 1, "at": 2, "s": "a"})
    real = make_update("todo", {"id": 2, "at": 1, "s": "a"}, {"id": 2, "at": 2, "s": "b"})
    unknown = make_update("todo", None, {"id": 3, "at": 2, "s": "b"})  # REPLICA IDENTITY DEFAULT
    archived = make_update("todo", {"id": 4, "s": "a"}, {"id": 4, "s": "archived"})
    big = make_update("todo", {"id": 99, "s": "a"}, {"id": 99, "s": "b"})
    route = Route(
        print,
        tables="todo",
        unwatched_fields={"at"},
        unwatched_records={"s": "archived"},
        where=lambda e: (e.new_record or {})["id"] != 99,
        exclude_columns={"at"},
    )
    kept = route.select([touch, real, unknown, archived, big])
    assert [(e.new_record or {})["id"] for e in kept] == [2, 3]
    assert kept[0].new_record == {"id": 2, "s": "b"}
    assert kept[0].changes == {"s": ("a", "b")}
    assert real.new_record is not None
    assert "at" in real.new_record  # shaping made new records; the event is whole
    only_id = Route(print, tables="todo", columns=["id"]).select([make_delete("todo", {"id": 5})])
    assert only_id[0].old_record == {"id": 5}


# -- the retry policy --------------------------------------------------------------


def test_one_default_retry_policy() -> None:
    policy = RetryPolicy()
    assert (policy.retries, policy.initial, policy.maximum) == (3, 0.5, 30.0)
    assert (policy.multiplier, policy.jitter) == (2.0, 0.1)
    # Handler routes and destination routes take the same default.
    assert Route(print).policy == Route(Memory()).policy == policy


def test_the_app_and_the_destinations_share_the_default_policy() -> None:
    from walex import WalEx
    from walex.destinations import Deliverer
    from walex.destinations import Route as DestinationRoute

    app = WalEx(name="p", url="postgresql://localhost/x", publication="p")
    app.add_handler(print, "insert", "todo")
    app.add_destination(Memory())
    handler, destination = app._routes
    assert handler.policy == destination.policy == RetryPolicy()
    assert DestinationRoute(Memory()).policy == RetryPolicy()
    assert Deliverer([Memory()]).routes[0].policy == RetryPolicy()


def test_delays_double_with_jitter_and_honour_retry_after() -> None:
    policy = RetryPolicy(initial=1, maximum=5, jitter=0.1, max_retry_after=60)
    for _ in range(200):
        delays = [policy.delay(n) for n in range(1, 6)]
        for got, base in zip(delays, [1, 2, 4, 5, 5], strict=True):
            assert base <= got <= base * 1.1
    assert RetryPolicy(initial=1, jitter=0).delay(3) == 4
    assert policy.delay(1, retry_after=7) == 7
    assert policy.delay(1, retry_after=600) == 60


def test_gives_up_after_the_retries() -> None:
    assert [RetryPolicy(retries=2).gives_up(n) for n in (1, 2, 3)] == [False, False, True]
    assert not RetryPolicy(retries=None).gives_up(10**9)
    assert RetryPolicy().with_retries(None).retries is None
    assert Route(print, retries=7, policy=FAST).policy == RetryPolicy(
        retries=7, initial=0.001, maximum=0.002
    )
    for bad in (
        {"retries": -1},
        {"retries": True},
        {"initial": 5, "maximum": 1},
        {"multiplier": 0.5},
        {"jitter": 2},
    ):
        with pytest.raises(ConfigurationError):
            RetryPolicy(**bad)


# -- dispatch and the error policies ---------------------------------------------------


async def test_handlers_run_in_order_then_destinations_together() -> None:
    trail: list[str] = []

    class Slow(Memory):
        async def send(self, events: Sequence[Event]) -> None:
            trail.append(f"{self.name} start")
            await asyncio.sleep(0.05)
            trail.append(f"{self.name} end")
            await super().send(events)

    def first(events: list[Event]) -> None:  # sync: in a worker thread
        trail.append("first")

    async def second(event: Event) -> None:  # one event at a time
        trail.append(f"second {(event.new_record or {})['id']}")

    a, b = Slow("a"), Slow("b")
    dispatcher = Dispatcher(
        [Route(a), Route(first), Route(b, tables="orders"), Route(second, tables="orders")]
    )
    async with dispatcher:
        await dispatcher.dispatch(rows("orders", "orders"))
    assert trail[:3] == ["first", "second 0", "second 1"]
    # Both destinations were under way before either finished.
    assert sorted(trail[3:5]) == ["a start", "b start"]
    assert (a.started, a.closed, len(a.sent), len(b.sent)) == (1, 1, 1, 1)


async def test_subscriptions_come_before_every_route() -> None:
    got = Recorder()
    dispatcher = Dispatcher([Route(got)], subscriptions=[parse_pattern("order_*")])
    message = make_message("p", b"m")
    await dispatcher.dispatch([*rows("orders", "order_items"), message])
    assert [e.table for e in got.got] == ["order_items", None]
    assert dispatcher.subscribed("public", "order_lines")
    assert not dispatcher.subscribed("app", "order_lines")


async def test_retries_then_success() -> None:
    handler = Recorder(fails=2)
    dest = Memory(errors=[DestinationError("busy"), ConnectionResetError("reset")])
    routes = [Route(handler, policy=FAST), Route(dest, policy=FAST)]
    await Dispatcher(routes).dispatch(rows("todo"))
    assert (handler.calls, dest.calls) == (3, 3)
    assert [r.delivered for r in routes] == [1, 1]


async def test_stop_raises_after_the_retries() -> None:
    handler = Recorder(fails=10, error=RuntimeError("boom"))
    app = Dispatcher([Route(handler, retries=2, policy=FAST)], stop_message="The app stops.")
    with pytest.raises(HandlerError, match=r"after 3 attempt\(s\): RuntimeError: boom. The app"):
        await app.dispatch(rows("todo"))
    assert handler.calls == 3
    # Without the app's wording, the error itself: a destination's as DestinationError.
    with pytest.raises(RuntimeError, match="boom"):
        await Dispatcher([Route(handler, retries=0, policy=FAST)]).dispatch(rows("todo"))
    dest = Memory(errors=[ConnectionError("away")])
    with pytest.raises(DestinationError, match="ConnectionError: away") as info:
        await Dispatcher([Route(dest, retries=0)]).dispatch(rows("todo"))
    assert isinstance(info.value.__cause__, ConnectionError)


async def test_skip_logs_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    bad = Recorder(fails=10)
    good = Recorder()
    skipping = Route(bad, name="bad", on_error="skip", retries=1, policy=FAST)
    with caplog.at_level(logging.ERROR, logger="walex.routing"):
        await Dispatcher([skipping, Route(good)], name="shop").dispatch(rows("todo", "todo"))
    assert len(good.got) == 2
    assert skipping.skipped == 2
    assert "shop: bad failed on 2 insert event(s) of public.todo" in caplog.text
    assert "after 2 attempt(s); skipped" in caplog.text


async def test_dead_letters_to_a_callable_a_file_and_a_destination(tmp_path: Path) -> None:
    letters: list[DeadLetter] = []
    path = tmp_path / "dead.jsonl"
    dead = Memory("dead")
    fails = Recorder(fails=10, error=KeyError("email"))
    routes = [
        Route(
            fails,
            name="cb",
            on_error="dead_letter",
            retries=1,
            policy=FAST,
            dead_letter=letters.append,
        ),
        Route(fails, name="file", on_error="dead_letter", retries=0, dead_letter=path),
        Route(fails, name="dest", on_error="dead_letter", retries=0, dead_letter=dead),
    ]
    dispatcher = Dispatcher(routes, name="shop")
    async with dispatcher:
        await dispatcher.dispatch(rows("todo"))
    (letter,) = letters
    assert (letter.app, letter.handler, letter.attempts) == ("shop", "cb", 2)
    assert isinstance(letter.error, KeyError)
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert (line["handler"], line["attempts"], line["error"]["type"]) == ("file", 1, "KeyError")
    assert line["events"][0]["new_record"] == {"id": 0}
    assert [e.id for e in dead.sent[0]] == [letter.events[0].id]
    assert dead.started == 1  # a dead-letter destination is started with the others
    assert [r.dead_lettered for r in routes] == [1, 1, 1]


async def test_a_failing_dead_letter_sink_stops() -> None:
    def sink(letter: DeadLetter) -> None:
        raise OSError("disk full")

    route = Route(Recorder(fails=1), on_error="dead_letter", retries=0, dead_letter=sink)
    with pytest.raises(HandlerError, match="dead letter could not be written"):
        await Dispatcher([route], stop_message="stop").dispatch(rows("todo"))


async def test_a_refusal_is_tried_once_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A DestinationError(retryable=False) (a webhook's 422) is not retried, and
    the dead letter and the log say 1 attempt, not retries + 1."""
    events = rows("todo", "todo", "todo")
    dest = Memory(
        errors=[DestinationError("422", retryable=False, failed=events[1:], rejected=events[1:2])]
    )
    path = tmp_path / "dead.jsonl"
    route = Route(dest, on_error="dead_letter", retries=5, dead_letter=path)
    with caplog.at_level(logging.ERROR, logger="walex.routing"):
        await Dispatcher([route]).dispatch(events)
    (letter,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert letter["attempts"] == 1
    assert [e["id"] for e in letter["events"]] == [events[1].id]
    assert "after 1 attempt(s)" in caplog.text
    # events[0] was accepted with the refusal, events[2] went in a send of its own.
    assert [e.id for e in dest.sent[0]] == [events[2].id]
    assert (route.delivered, route.dead_lettered, dest.calls) == (2, 1, 2)


async def test_a_raising_where_goes_through_the_policy() -> None:
    letters: list[DeadLetter] = []
    route = Route(
        print,
        name="h",
        where=lambda e: 1 / 0 > 0,
        on_error="dead_letter",
        dead_letter=letters.append,
    )
    await Dispatcher([route]).dispatch(rows("todo"))
    assert letters[0].handler == "h (where)"
    assert letters[0].attempts == 1


async def test_functions_run_after_the_target_and_observers_see_every_attempt() -> None:
    seen: list[tuple[str, str, str, bool]] = []

    class Observer:
        def on_handler(
            self, name: str, table: str, kind: str, seconds: float, error: BaseException | None
        ) -> None:
            seen.append((name, table, kind, error is None))

    trail: list[str] = []

    def audit(event: Event) -> None:
        trail.append("audit")
        if trail.count("audit") == 1:
            raise ValueError("once")

    handler = Recorder(fails=1)
    dest = Memory("dest", errors=[ConnectionError("once")])
    routes = [
        Route(handler, name="h", types={"insert"}, functions=[audit], policy=FAST),
        Route(dest, policy=FAST),
    ]
    await Dispatcher(routes, observers=[Observer()]).dispatch(rows("todo"))
    assert trail == ["audit", "audit"]
    assert [(n.split(" → ")[-1].rsplit(".", 1)[-1], ok) for n, _, _, ok in seen] == [
        ("h", False),
        ("h", True),
        ("audit", False),
        ("audit", True),
        ("dest", False),
        ("dest", True),
    ]
    assert {(t, k) for _, t, k, _ in seen} == {("public.todo", "insert"), ("public.todo", "event")}


# -- a stop during a retry wait ------------------------------------------------------


@pytest.mark.parametrize("kind", ["handler", "destination"])
async def test_a_stop_ends_a_retry_wait_at_once(kind: str) -> None:
    stop = asyncio.Event()
    target: Any = (
        Recorder(fails=10) if kind == "handler" else Memory(errors=[ConnectionError()] * 10)
    )
    route = Route(target, retries=None, policy=SLOW)
    dispatcher = Dispatcher([route], stop=stop)
    task = asyncio.ensure_future(dispatcher.dispatch(rows("todo")))
    await asyncio.sleep(0.1)  # the first try failed; it waits 30 s to retry
    assert not task.done()
    started = time.monotonic()
    stop.set()
    with pytest.raises(Abandoned):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1
    assert route.delivered == 0
    # Already asked to stop: a failure does not wait at all.
    with pytest.raises(Abandoned):
        await asyncio.wait_for(dispatcher.dispatch(rows("todo")), 5)


async def test_a_stop_ends_the_wait_of_send_with_retry_and_of_a_dead_letter() -> None:
    stop = asyncio.Event()
    stop.set()

    async def on_give_up(failed: Sequence[Event], error: DestinationError) -> None:
        raise AssertionError("not given up: abandoned")

    dest = Memory(errors=[ConnectionError()])
    with pytest.raises(Abandoned):
        await send_with_retry(dest, rows("todo"), SLOW, on_give_up=on_give_up, stop=stop)
    dead = Memory("dead", errors=[ConnectionError()])
    # A handler's own DestinationError(retryable=False) is not retried either;
    # the dead-letter destination's failure is, and that wait ends at once.
    refused = Recorder(fails=1, error=DestinationError("no", retryable=False))
    route = Route(refused, on_error="dead_letter", retries=1, dead_letter=dead, policy=SLOW)
    with pytest.raises(Abandoned):
        await Dispatcher([route], stop=stop).dispatch(rows("todo"))
    assert (refused.calls, dead.calls) == (1, 1)


async def test_a_destination_with_several_in_flight_stops_them_all() -> None:
    stop = asyncio.Event()
    down = Memory("down", errors=[ConnectionError()] * 10)
    fine = Memory("fine")
    dispatcher = Dispatcher([Route(down, policy=SLOW), Route(fine)], stop=stop)
    task = asyncio.ensure_future(dispatcher.dispatch(rows("todo")))
    await asyncio.sleep(0.1)
    stop.set()
    with pytest.raises(Abandoned):
        await asyncio.wait_for(task, 5)
    assert len(fine.sent) == 1


# -- patterns against the publication ----------------------------------------------------


def test_unmatched_patterns() -> None:
    published = {("public", "orders"), ("public", "order_items"), ("app", "audit")}
    subs = [parse_pattern("public.*")]
    routes = [
        Route(print, name="ok", tables=["order_*", "*"], types={"insert"}),
        Route(print, name="none", tables="invoice_*", types={"insert"}),
        Route(Memory("d"), tables="app.audit"),
        Route(print, name="messages", tables=[], types={"message"}),
    ]
    problems = unmatched_patterns(routes, subs, published)
    assert [(p.owner, str(p.pattern), p.left_out) for p in problems] == [
        ("handler none", "public.invoice_*", ()),
        ("destination d", "app.audit", (("app", "audit"),)),
    ]
    assert [
        (p.owner, str(p.pattern))
        for p in unmatched_patterns([], [parse_pattern("x_*"), parse_pattern("*")], published)
    ] == [("subscriptions", "public.x_*")]


def test_destination_protocol_lives_in_routing() -> None:
    import walex.destinations
    import walex.destinations._base

    assert walex.destinations.Destination is Destination
    assert walex.destinations._base.Destination is Destination
    assert isinstance(Memory(), Destination)


# -- pipelined delivery --------------------------------------------------------


class FakeStream:
    """Batches to read, and what was acknowledged (in order of acknowledgement)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)
        self.read_count = 0
        self.acked: list[Any] = []
        self.max_in_flight = 0

    async def read(self) -> Any:
        if self.read_count == len(self.batches):
            raise StopAsyncIteration
        batch = self.batches[self.read_count]
        self.read_count += 1
        self.max_in_flight = max(self.max_in_flight, self.read_count - len(self.acked))
        await asyncio.sleep(0)
        return batch

    def ack(self, batch: Any, seconds: float) -> None:
        assert seconds >= 0
        self.acked.append(batch)


class SlowMemory(Memory):
    """A destination whose every send takes a round trip."""

    async def send(self, events: Sequence[Event]) -> None:
        await asyncio.sleep(0.01)
        await super().send(events)


def small_batches(n: int, rows_each: int = 2) -> list[Any]:
    return [
        make_batch(*(make_insert("todo", {"id": i * rows_each + k}) for k in range(rows_each)))
        for i in range(n)
    ]


async def test_a_pipeline_sends_many_transactions_per_round_trip_in_order() -> None:
    dest = SlowMemory()
    stream = FakeStream(small_batches(200))
    await Pipeline(Dispatcher([Route(dest)])).run(stream.read, stream.ack)
    got = [e.new_record["id"] for b in dest.sent for e in b]  # type: ignore[index]
    assert got == list(range(400))
    assert dest.calls < 50  # not one round trip per transaction
    assert len(stream.acked) == 200


async def test_a_batch_is_acknowledged_only_after_every_destination_has_it() -> None:
    fast, slow = Memory("fast"), SlowMemory("slow")
    stream = FakeStream(small_batches(5))
    acked_when: list[int] = []

    def ack(batch: Any, seconds: float) -> None:
        acked_when.append(sum(map(len, slow.sent)))
        stream.ack(batch, seconds)

    await Pipeline(Dispatcher([Route(fast), Route(slow)])).run(stream.read, ack)
    # At each acknowledgement the slow destination already had that batch's events.
    assert all(count >= 2 * (i + 1) for i, count in enumerate(acked_when))


async def test_the_window_bounds_what_is_read_ahead() -> None:
    stream = FakeStream(small_batches(100, rows_each=10))
    await Pipeline(Dispatcher([Route(SlowMemory())]), window_events=30).run(stream.read, stream.ack)
    # 30 events in flight at most: 3 batches, and the one the reader holds.
    assert stream.max_in_flight <= 4
    assert len(stream.acked) == 100


async def test_handlers_run_in_order_before_their_batch_is_queued() -> None:
    seen: list[int] = []
    dest = SlowMemory()

    def handler(events: list[Event]) -> None:
        seen.extend(e.new_record["id"] for e in events)  # type: ignore[index]

    stream = FakeStream(small_batches(20))
    dispatcher = Dispatcher([Route(handler, tables="todo"), Route(dest)])
    await Pipeline(dispatcher).run(stream.read, stream.ack)
    assert seen == list(range(40))
    assert [e.new_record["id"] for b in dest.sent for e in b] == list(range(40))  # type: ignore[index]


async def test_a_destination_that_gives_up_stops_the_pipeline_unacknowledged() -> None:
    dest = Memory(errors=[DestinationError("refused", retryable=False)])
    stream = FakeStream(small_batches(10))
    with pytest.raises(DestinationError, match="refused"):
        await Pipeline(Dispatcher([Route(dest, policy=FAST)])).run(stream.read, stream.ack)
    # What the failed send carried is not acknowledged (the first batch at least).
    assert stream.batches[0] not in stream.acked


async def test_a_stop_reads_no_more_but_delivers_what_was_read() -> None:
    dest = SlowMemory()
    stop = asyncio.Event()
    stream = FakeStream(small_batches(1000))

    async def stop_soon() -> None:
        await asyncio.sleep(0.05)
        stop.set()

    stopper = asyncio.ensure_future(stop_soon())
    pipeline = Pipeline(Dispatcher([Route(dest)], stop=stop), window_events=20)
    await pipeline.run(stream.read, stream.ack, stop=stop)
    await stopper
    assert 0 < stream.read_count < 1000
    # Everything read was delivered and acknowledged: nothing left in flight.
    assert len(stream.acked) == stream.read_count
    assert sum(map(len, dest.sent)) == 2 * stream.read_count


async def test_a_stop_during_a_retry_wait_abandons_unacknowledged() -> None:
    dest = Memory(errors=[ConnectionError("down")] * 100)
    stop = asyncio.Event()
    stream = FakeStream(small_batches(3))
    asyncio.get_running_loop().call_later(0.05, stop.set)
    with pytest.raises(Abandoned):
        await Pipeline(Dispatcher([Route(dest, policy=SLOW)], stop=stop)).run(
            stream.read, stream.ack, stop=stop
        )
    assert stream.acked == []

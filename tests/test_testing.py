"""walex.testing: an app's handlers on hand-made events, no Postgres."""

from __future__ import annotations

from typing import Any

import pytest

from walex import Event, WalEx
from walex.app import DeadLetter
from walex.errors import HandlerError
from walex.testing import (
    dispatch,
    make_batch,
    make_delete,
    make_insert,
    make_message,
    make_truncate,
    make_update,
    run_events,
)


def app(**kw: Any) -> WalEx:
    kw.setdefault("retry_delay", 0)
    return WalEx(name="t", url="host=nowhere", publication="p", **kw)


def test_builders_make_what_postgres_would_send() -> None:
    ins = make_insert("app.todo", {"id": 1, "title": "a"})
    assert (ins.type, ins.schema, ins.table, ins.new_record, ins.old_record) == (
        "insert",
        "app",
        "todo",
        {"id": 1, "title": "a"},
        None,
    )
    assert ins.source is not None
    assert dict(ins.source.columns) == {"id": "bigint", "title": "text"}
    assert ins.source.primary_key == ("id",)
    full = make_update("todo", {"id": 1, "done": False}, {"id": 1, "done": True})
    assert full.changes == {"done": (False, True)}
    default = make_update("todo", None, {"id": 1, "done": True})
    assert default.changes is None
    assert default.source is not None
    assert default.source.replica_identity == "default"
    toast = make_update("todo", None, {"id": 1}, unchanged_toast={"body"})
    assert toast.unchanged_toast == {"body"}
    dele = make_delete("todo", {"id": 1})
    assert (dele.record, dele.new_record) == ({"id": 1}, None)
    trunc = make_truncate("todo", cascade=True)
    assert (trunc.truncated, trunc.cascade) == (("public.todo",), True)
    msg = make_message("outbox", "hi")
    assert (msg.prefix, msg.content, msg.transactional, msg.source) == ("outbox", b"hi", True, None)


def test_make_batch_stamps_one_transaction() -> None:
    b = make_batch(make_insert("a", {"id": 1}), make_insert("b", {"id": 2}), commit_lsn=0x5000)
    assert b.last
    assert [e.seq for e in b.events] == [0, 1]
    assert {e.transaction for e in b.events} == {b.transaction}
    assert [e.id for e in b.events] == ["0/5000:0", "0/5000:1"]
    assert b.end_lsn is not None
    assert b.end_lsn > b.commit_lsn


def test_run_events_routes_like_the_app() -> None:
    a = app(subscriptions=["todo", "user_account"])
    got: list[tuple[str, Any]] = []

    @a.on_insert("user_account")
    def welcome(events: list[Event]) -> None:
        got.append(("welcome", [e.new_record for e in events]))

    @a.on_update("todo", unwatched_fields={"updated_at"})
    async def todo(event: Event) -> None:
        got.append(("todo", event.changes))

    @a.on_message(prefix="outbox")
    def outbox(events: list[Event]) -> None:
        got.append(("outbox", [e.content for e in events]))

    run_events(
        a,
        make_batch(
            make_insert("user_account", {"id": 1}),
            make_insert("other", {"id": 2}),  # not subscribed
            make_update("todo", {"id": 1, "updated_at": 1}, {"id": 1, "updated_at": 2}),
            make_update("todo", {"id": 1, "t": "a"}, {"id": 1, "t": "b"}),
            make_message("outbox", "x"),
            make_message("other", "y"),
        ),
    )
    assert got == [
        ("welcome", [{"id": 1}]),
        ("todo", {"t": ("a", "b")}),
        ("outbox", [b"x"]),
    ]


async def test_dispatch_applies_the_error_policy() -> None:
    letters: list[DeadLetter] = []
    a = app(retries=2, on_error="dead_letter", dead_letter=letters.append)
    calls: list[int] = []

    @a.on_delete("todo")
    def fails(events: list[Event]) -> None:
        calls.append(1)
        raise ValueError("nope")

    @a.on_insert("todo", on_error="stop", retries=0)
    async def stops(events: list[Event]) -> None:
        raise RuntimeError("halt")

    @a.on_truncate("todo", on_error="skip")
    async def skipped(events: list[Event]) -> None:
        raise RuntimeError("ignored")

    await dispatch(a, make_delete("todo", {"id": 1}), make_truncate("todo"))
    assert len(calls) == 3
    (letter,) = letters
    assert letter.handler.endswith("fails")
    assert letter.attempts == 3
    assert letter.to_dict()["events"][0]["old_record"] == {"id": 1}
    with pytest.raises(HandlerError, match="halt"):
        await dispatch(a, make_insert("todo", {"id": 2}))


def test_handler_registration_errors() -> None:
    a = app()
    from walex.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="unknown filter"):
        a.on_insert("todo", {"unwatched": ["x"]})(print)
    with pytest.raises(ConfigurationError, match="columns or exclude_columns"):
        a.on_insert("todo", columns=["a"], exclude_columns=["b"])(print)
    with pytest.raises(ConfigurationError, match="on_error must be"):
        a.on_insert("todo", on_error="ignore")(print)
    with pytest.raises(ConfigurationError, match="needs the app's dead_letter"):
        a.on_insert("todo", on_error="dead_letter")(print)
    with pytest.raises(ConfigurationError, match="table: "):
        a.on_insert("a.b.c")(print)
    with pytest.raises(ConfigurationError, match="unwatched_fields must be"):
        a.on_update("todo", unwatched_fields="updated_at")(print)


async def test_a_raising_where_predicate_goes_through_the_policy() -> None:
    letters: list[DeadLetter] = []
    a = app(on_error="dead_letter", dead_letter=letters.append)
    a.on_insert("todo", where=lambda e: 1 / 0 > 0)(print)
    await dispatch(a, make_insert("todo", {"id": 1}))
    assert letters[0].handler.endswith("(where)")
    assert isinstance(letters[0].error, ZeroDivisionError)
    stops = app()
    stops.on_insert("todo", where=lambda e: 1 / 0 > 0)(print)
    with pytest.raises(HandlerError, match="ZeroDivisionError"):
        await dispatch(stops, make_insert("todo", {"id": 1}))


async def test_a_where_that_raises_on_a_truncate_skips_only_the_truncate() -> None:
    got: list[str] = []
    a = app(on_error="skip")

    @a.on_event("todo", where=lambda e: e.record["id"] > 0)  # type: ignore[index]
    def handler(events: list[Event]) -> None:
        got.extend(e.type for e in events)

    await dispatch(
        a,
        make_batch(
            make_insert("todo", {"id": 1}),
            make_truncate("todo"),  # record is None: the predicate raises TypeError
            make_insert("todo", {"id": 2}),
        ),
    )
    assert got == ["insert", "insert"]

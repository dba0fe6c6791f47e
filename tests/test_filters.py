"""walex.filters: WalEx's TransactionFilter helpers, on hand-made events."""

from __future__ import annotations

import pytest

from walex import filters
from walex.filters import Relation, parse_relation
from walex.testing import (
    make_batch,
    make_delete,
    make_insert,
    make_message,
    make_source,
    make_truncate,
    make_update,
)

TODO = {"id": 1, "title": "a", "status": "open", "updated_at": 1}


def batch():  # type: ignore[no-untyped-def]
    return make_batch(
        make_insert("todo", TODO),
        make_update("app.todo", {**TODO, "title": "a"}, {**TODO, "title": "b"}),
        make_delete("user_account", {"id": 3}),
        make_truncate("app.audit"),
        make_message("outbox", "hi"),
    )


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("todo", Relation("public", "todo")),
        ("app.todo", Relation("app", "todo")),
        ("app:todo", Relation("app", "todo")),
        ("app.*", Relation("app", None)),
        ("*", Relation(None, None)),
        ('"Odd Table"', Relation("public", "Odd Table")),
        ('"my.schema"."a ""b"""', Relation("my.schema", 'a "b"')),
        (("s", "t"), Relation("s", "t")),
    ],
)
def test_parse_relation(pattern: str, expected: Relation) -> None:
    assert parse_relation(pattern) == expected


@pytest.mark.parametrize("bad", ["", "a.b.c", '"open', ".t"])
def test_parse_relation_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=r"pattern|quote"):
        parse_relation(bad)


def test_bare_name_is_a_schema_for_matches() -> None:
    assert parse_relation("app", bare="schema") == Relation("app", None)


def test_is_insert_update_delete() -> None:
    b = batch()
    assert filters.is_insert(b, "todo")
    assert filters.is_insert(b, "public.todo")
    assert not filters.is_insert(b, "app.todo")
    assert filters.is_update(b, "app.todo")
    assert not filters.is_update(b, "todo")
    assert filters.is_delete(b, "user_account")
    assert not filters.is_delete(b.events[:2], "user_account")


def test_matches_event_and_relation_patterns() -> None:
    b = batch()
    ins, upd = b.events[0], b.events[1]
    assert filters.matches(ins)
    assert filters.matches(ins, event="insert", relation="public")
    assert filters.matches(ins, event="*", relation="public.todo")
    assert filters.matches(ins, event="insert", relation="public:todo")
    assert not filters.matches(ins, event="update", relation="*")
    assert not filters.matches(ins, event="insert", relation="app")
    assert filters.matches(upd, event="update", relation="app")
    assert filters.matches(b, event="truncate", relation="app.audit")
    assert not filters.matches(b, event="truncate", relation="public")
    assert not filters.matches(b.events[4], relation="*")  # a message has no table
    with pytest.raises(ValueError, match="event must be"):
        filters.matches(ins, event="INSERT")


def test_has_table_and_record_type() -> None:
    b = batch()
    assert filters.has_table(b.events[0], "todo")
    assert not filters.has_table(b.events[0], "app.todo")
    assert filters.has_table(b, "app.audit")
    assert not filters.has_table(b, "nope")
    assert filters.record_type(b.events[0], "insert")
    assert filters.record_type(b.events[2], "insert", "delete")
    assert not filters.record_type(b.events[1], "insert")


def test_subscribes_and_filter_subscribed() -> None:
    b = batch()
    subs = ["todo", "user_account"]
    assert filters.subscribes(b.events[0], subs)
    assert not filters.subscribes(b.events[1], subs)
    assert filters.subscribes(b.events[1], "app.*")
    assert [e.type for e in filters.filter_subscribed(b, subs)] == ["insert", "delete"]
    assert [e.type for e in filters.filter_subscribed(b, "*")] == [
        "insert",
        "update",
        "delete",
        "truncate",
    ]


def test_filter_changes() -> None:
    b = batch()
    assert [e.type for e in filters.filter_changes(b, "app.*")] == ["update", "truncate"]
    assert [e.type for e in filters.filter_changes(b, "*", "delete")] == ["delete"]
    assert filters.filter_changes(b, "app.*", "update", subscriptions=["todo"]) == []


def test_map_changes_and_map_columns() -> None:
    assert filters.map_changes({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5}) == {"b": (2, 5)}
    assert filters.map_changes(None, {"a": 1}) == {}
    src = make_source("todo", columns={"id": "integer", "title": "text"})
    assert filters.map_columns(src) == {"id": "integer", "title": "text"}
    assert filters.map_columns(make_insert("todo", {"id": 1}, source=src)) == {
        "id": "integer",
        "title": "text",
    }
    assert filters.map_columns(make_message("p", "x")) == {}


def test_filter_unwatched_fields() -> None:
    only_stamp = make_update("todo", TODO, {**TODO, "updated_at": 2})
    title = make_update("todo", TODO, {**TODO, "title": "z", "updated_at": 2})
    nothing = make_update("todo", TODO, dict(TODO))
    unknown = make_update("todo", None, {**TODO, "updated_at": 2})  # REPLICA IDENTITY DEFAULT
    insert = make_insert("todo", TODO)
    assert unknown.changes is None
    kept = filters.filter_unwatched_fields(
        [only_stamp, title, nothing, unknown, insert], {"updated_at"}
    )
    assert kept == [title, unknown, insert]


def test_filter_unwatched_records() -> None:
    archived = make_insert("todo", {**TODO, "status": "archived"})
    other = make_insert("todo", TODO)
    deleted = make_delete("todo", {**TODO, "status": "archived"})
    trunc = make_truncate("todo")
    kept = filters.filter_unwatched_records(
        make_batch(archived, other, deleted, trunc), {"status": "archived"}
    )
    assert [e.type for e in kept] == ["insert", "truncate"]
    assert (kept[0].new_record or {})["status"] == "open"
    # Every given column must match for the record to be unwatched.
    assert filters.filter_unwatched_records(
        [archived], {"status": "archived", "title": "other"}
    ) == [archived]

"""WalEx's ``TransactionFilter`` helpers, in Python.

Pure functions: no I/O, no state, nothing that routes or retries (that is
:mod:`walex.routing`).

Pure functions over :class:`~walex.Event` lists and :class:`~walex.Batch`
objects: no I/O, usable inside handlers, in tests and on anything
:mod:`walex.testing` builds.

Table names follow one rule everywhere in walex: ``"todo"`` means the table
``todo`` in the schema ``public``, ``"app.todo"`` names the schema, and
``"*"`` / ``"app.*"`` mean every table (of a schema), ``"order_*"`` is a
shell-style pattern. Quote a name that holds a dot: ``'"odd.name"'``.
``schema:table`` (WalEx's spelling) is accepted too. The grammar is
:mod:`walex.names`.

Example::

    from walex import filters

    async def process(batch):
        if filters.is_insert(batch, "user_account"):
            for event in filters.filter_changes(batch, "user_account", "insert"):
                ...
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

from .events import Batch, Event, Source
from .names import TablePattern, parse_pattern

__all__ = [
    "Relation",
    "filter_changes",
    "filter_subscribed",
    "filter_unwatched_fields",
    "filter_unwatched_records",
    "has_table",
    "is_delete",
    "is_insert",
    "is_update",
    "map_changes",
    "map_columns",
    "matches",
    "parse_relation",
    "record_type",
    "subscribes",
    "unwatched_fields",
    "watched_record",
]

Events = Batch | Iterable[Event]
"""What the helpers accept: a batch, or any iterable of events."""

_TYPES = frozenset({"insert", "update", "delete", "truncate", "message"})


Relation = TablePattern
"""A table pattern (see :mod:`walex.names`): ``schema`` and ``table``, ``None`` for any."""


def parse_relation(
    pattern: str | tuple[str, str] | TablePattern, *, bare: Literal["table", "schema"] = "table"
) -> TablePattern:
    """Turn a table pattern into a :class:`Relation` (:func:`walex.names.parse_pattern`).

    Args:
        pattern: ``"todo"``, ``"app.todo"``, ``"app:todo"``, ``"app.*"``,
            ``"order_*"``, ``"*"``, a quoted name (``'"Odd Table"'``) or a
            ``(schema, table)`` pair.
        bare: what a name without a schema means: ``"table"`` (a table in
            ``public``, the rule for subscriptions and handlers) or
            ``"schema"`` (every table of that schema, WalEx's ``matches?``).

    Raises:
        ValueError: the pattern is empty or malformed.
    """
    return parse_pattern(pattern, bare=bare)


def _events(events: Events) -> Iterable[Event]:
    return events.events if isinstance(events, Batch) else events


def _type_of(event: Event, type: str) -> bool:
    return type == "*" or event.type == type


def matches(change: Event | Events, event: str = "*", relation: str = "*") -> bool:
    """WalEx's ``matches?``: whether a change matches an event type and a relation.

    Args:
        change: one event, or a batch / list (then: whether any of them matches).
        event: ``"insert"``, ``"update"``, ``"delete"``, ``"truncate"`` or ``"*"``.
        relation: ``"schema.table"`` (or ``"schema:table"``), ``"schema"``
            (every table in it) or ``"*"``.

    Example::

        matches(batch, event="insert", relation="public")      # any insert in public
        matches(event, event="*", relation="public.todo")
    """
    if event != "*" and event not in _TYPES:
        raise ValueError(f"event must be one of {sorted(_TYPES)} or '*', not {event!r}")
    rel = parse_relation(relation, bare="schema")
    if isinstance(change, Event):
        return _type_of(change, event) and rel.matches(change.source)
    return any(_type_of(e, event) and rel.matches(e.source) for e in _events(change))


def is_insert(events: Events, table: str) -> bool:
    """Whether *events* hold an insert into *table* (``"todo"`` means ``public.todo``)."""
    return _has(events, "insert", table)


def is_update(events: Events, table: str) -> bool:
    """Whether *events* hold an update of *table*."""
    return _has(events, "update", table)


def is_delete(events: Events, table: str) -> bool:
    """Whether *events* hold a delete from *table*."""
    return _has(events, "delete", table)


def _has(events: Events, type: str, table: str) -> bool:
    rel = parse_relation(table)
    return any(e.type == type and rel.matches(e.source) for e in _events(events))


def has_table(event: Event | Events, table: str) -> bool:
    """Whether an event (or any event of a batch / list) is about *table*."""
    rel = parse_relation(table)
    if isinstance(event, Event):
        return rel.matches(event.source)
    return any(rel.matches(e.source) for e in _events(event))


def subscribes(event: Event, subscriptions: str | Iterable[str]) -> bool:
    """Whether *event*'s table is one of *subscriptions* (table patterns)."""
    pats = [subscriptions] if isinstance(subscriptions, str) else subscriptions
    return any(parse_relation(p).matches(event.source) for p in pats)


def filter_subscribed(events: Events, subscriptions: str | Iterable[str]) -> list[Event]:
    """The events whose table is one of *subscriptions*, in order."""
    pats = [
        parse_relation(p)
        for p in ([subscriptions] if isinstance(subscriptions, str) else subscriptions)
    ]
    return [e for e in _events(events) if any(p.matches(e.source) for p in pats)]


def filter_changes(
    events: Events,
    table: str,
    type: str | None = None,
    subscriptions: str | Iterable[str] | None = None,
) -> list[Event]:
    """The events of *table* (and of *type*, if given), in order.

    Args:
        events: a batch or a list of events.
        table: a table pattern (``"todo"``, ``"app.todo"``, ``"*"``).
        type: ``"insert"``, ``"update"``, ``"delete"`` or ``"truncate"``;
            ``None`` for all.
        subscriptions: if given, keep only subscribed tables as well.
    """
    rel = parse_relation(table)
    out = [e for e in _events(events) if rel.matches(e.source) and (type is None or e.type == type)]
    if subscriptions is not None:
        out = filter_subscribed(out, subscriptions)
    return out


def record_type(event: Event, *types: str) -> bool:
    """WalEx's ``is_type?``: whether *event* is of one of *types* (``"insert"``, ...)."""
    return event.type in types


def map_changes(
    old_record: Mapping[str, Any] | None, new_record: Mapping[str, Any] | None
) -> dict[str, tuple[Any, Any]]:
    """Column → ``(old, new)`` for each column of *old_record* whose value differs.

    The same diff as :attr:`Event.changes`, for two records of your own
    (for instance the old row you keep in a cache, under REPLICA IDENTITY
    DEFAULT where Postgres sends none). A column missing from *new_record*
    is not a change: an unchanged TOAST value is left out of records.
    """
    if old_record is None or new_record is None:
        return {}
    return {
        k: (v, new_record[k])
        for k, v in old_record.items()
        if k in new_record and new_record[k] != v
    }


def map_columns(source: Source | Event) -> dict[str, str]:
    """Column name → type name (``"integer"``, ``"text[]"``) of a table."""
    src = source.source if isinstance(source, Event) else source
    return dict(src.columns) if src is not None else {}


def unwatched_fields(event: Event, fields: Collection[str]) -> bool:
    """Whether to keep *event* given columns whose changes do not matter.

    Only updates are judged. An update is dropped when every column that
    changed is in *fields* (a change to ``updated_at`` alone, say). When the
    changed columns are unknown (``event.changes is None``: REPLICA IDENTITY
    DEFAULT or USING INDEX), the update is kept: unknown is not "nothing that
    matters changed".
    """
    if event.type != "update":
        return True
    changes = event.changes
    if changes is None:
        return True
    return any(k not in fields for k in changes)


def watched_record(event: Event, records: Mapping[str, Any]) -> bool:
    """Whether to keep *event* given column values that mark unwatched rows.

    The event is dropped when its record (the new row; the old row for a
    delete) has every column of *records* with the given value. Truncates and
    messages have no record and are kept.
    """
    record = event.record
    if record is None or not records:
        return True
    return not all(k in record and record[k] == v for k, v in records.items())


def filter_unwatched_fields(events: Events, fields: Collection[str]) -> list[Event]:
    """The events :func:`unwatched_fields` keeps."""
    return [e for e in _events(events) if unwatched_fields(e, fields)]


def filter_unwatched_records(events: Events, records: Mapping[str, Any]) -> list[Event]:
    """The events :func:`watched_record` keeps."""
    return [e for e in _events(events) if watched_record(e, records)]

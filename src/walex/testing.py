"""Test your handlers without Postgres.

It owns running an app's dispatch on hand-made events; it must not open a
stream or a connection.

Build events by hand and run an app's handlers on them, exactly as the app
runs them on a stream: the same routing, filters, shaping, ``functions``
pipelines, retries and error policy. Nothing connects.

Example::

    from walex.testing import make_insert, make_update, run_events

    def test_welcome_email(outbox):
        run_events(app, make_insert("user_account", {"id": 1, "email": "a@b.c"}))
        assert outbox == ["a@b.c"]

    async def test_todo_done():
        await dispatch(app, make_update("todo", {"id": 1, "done": False},
                                                {"id": 1, "done": True}))
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from .app import WalEx
from .events import Batch, Event, Source, Transaction
from .filters import parse_relation
from .lsn import LSN

__all__ = [
    "dispatch",
    "make_batch",
    "make_delete",
    "make_insert",
    "make_message",
    "make_source",
    "make_truncate",
    "make_update",
    "run_events",
]

_lsn = itertools.count(0x1000000, 0x100)
_xid = itertools.count(1000)
_NO_TOAST: frozenset[str] = frozenset()
_TYPE_NAMES: list[tuple[type, str]] = [
    (bool, "boolean"),
    (int, "bigint"),
    (float, "double precision"),
    (Decimal, "numeric"),
    (str, "text"),
    (bytes, "bytea"),
    (datetime, "timestamp with time zone"),
    (date, "date"),
    (time, "time without time zone"),
    (timedelta, "interval"),
    (UUID, "uuid"),
    (dict, "jsonb"),
    (list, "jsonb"),
]


def _type_name(value: Any) -> str:
    for cls, name in _TYPE_NAMES:
        if isinstance(value, cls):
            return name
    return "text"


def make_source(
    table: str,
    record: Mapping[str, Any] | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    primary_key: Iterable[str] | None = None,
    replica_identity: str = "full",
    database: str = "test",
) -> Source:
    """A :class:`~walex.Source` for *table* (``"todo"`` or ``"app.todo"``).

    Column types are guessed from *record*'s Python values unless *columns*
    gives them; the primary key is ``id`` when the record has one.
    """
    rel = parse_relation(table)
    if rel.schema is None or rel.table is None:
        raise ValueError(f"name one table, not a pattern: {table!r}")
    record = record or {}
    cols = dict(columns) if columns is not None else {k: _type_name(v) for k, v in record.items()}
    if primary_key is None:
        primary_key = ("id",) if "id" in cols else ()
    pk = tuple(primary_key)
    identity = tuple(cols) if replica_identity == "full" else pk
    return Source(database, rel.schema, rel.table, cols, pk, replica_identity, identity, 0)


def _txn(
    commit_lsn: LSN | int | None, commit_timestamp: datetime | None, xid: int | None
) -> Transaction:
    return Transaction(
        next(_xid) if xid is None else xid,
        LSN(next(_lsn) if commit_lsn is None else commit_lsn),
        commit_timestamp or datetime.now(UTC),
    )


def _event(
    type_: str,
    source: Source | None,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    *,
    unchanged_toast: Iterable[str] = (),
    seq: int = 0,
    commit_lsn: LSN | int | None = None,
    commit_timestamp: datetime | None = None,
    xid: int | None = None,
    **extra: Any,
) -> Event:
    txn = _txn(commit_lsn, commit_timestamp, xid)
    return Event(
        type_,  # type: ignore[arg-type]
        source,
        new,
        old,
        frozenset(unchanged_toast) or _NO_TOAST,
        LSN(txn.commit_lsn - 0x10 + seq if txn.commit_lsn > 0x10 else seq),
        seq,
        txn,
        **extra,
    )


def make_insert(
    table: str, record: Mapping[str, Any], *, source: Source | None = None, **options: Any
) -> Event:
    """An insert of *record* into *table*.

    Options: ``columns``, ``primary_key``, ``replica_identity`` (for the
    source), ``seq``, ``commit_lsn``, ``commit_timestamp``, ``xid``.
    """
    src_opts = _source_options(options)
    src = source or make_source(table, record, **src_opts)
    return _event("insert", src, dict(record), None, **options)


def make_update(
    table: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    *,
    source: Source | None = None,
    **options: Any,
) -> Event:
    """An update of *table* from *old* to *new*.

    With *old* given the table is ``REPLICA IDENTITY FULL`` and
    :attr:`Event.changes` is the diff; with ``old=None`` it is ``DEFAULT``
    and ``changes`` is ``None``, as Postgres would send it. Also accepts
    ``unchanged_toast`` and the options of :func:`make_insert`.
    """
    src_opts = _source_options(options)
    src_opts.setdefault("replica_identity", "full" if old is not None else "default")
    src = source or make_source(table, new, **src_opts)
    return _event("update", src, dict(new), dict(old) if old is not None else None, **options)


def make_delete(
    table: str, old: Mapping[str, Any], *, source: Source | None = None, **options: Any
) -> Event:
    """A delete from *table* of the row *old* (its key columns, or all under FULL)."""
    src_opts = _source_options(options)
    src = source or make_source(table, old, **src_opts)
    return _event("delete", src, None, dict(old), **options)


def make_truncate(
    table: str, *, cascade: bool = False, restart_identity: bool = False, **options: Any
) -> Event:
    """A TRUNCATE of *table*."""
    src_opts = _source_options(options)
    src = make_source(table, **src_opts)
    return _event(
        "truncate",
        src,
        None,
        None,
        truncated=(src.name,),
        cascade=cascade,
        restart_identity=restart_identity,
        **options,
    )


def make_message(
    prefix: str, content: bytes | str, *, transactional: bool = True, **options: Any
) -> Event:
    """A logical message, as ``pg_logical_emit_message(transactional, prefix, content)``."""
    data = content.encode() if isinstance(content, str) else bytes(content)
    return _event(
        "message",
        None,
        None,
        None,
        prefix=prefix,
        content=data,
        transactional=transactional,
        **options,
    )


def _source_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: options.pop(k)
        for k in ("columns", "primary_key", "replica_identity", "database")
        if k in options
    }


def make_batch(
    *events: Event,
    commit_lsn: LSN | int | None = None,
    commit_timestamp: datetime | None = None,
    xid: int | None = None,
    last: bool = True,
) -> Batch:
    """One transaction holding *events*, in the order given.

    The events are re-stamped with the batch's transaction and with ``seq``
    0, 1, 2, ... so that their ids are those Postgres would give.
    """
    txn = _txn(commit_lsn, commit_timestamp, xid)
    stamped = [
        e._replace(transaction=txn, seq=i, lsn=LSN(max(txn.commit_lsn - len(events) + i, 0)))
        for i, e in enumerate(events)
    ]
    end = LSN(txn.commit_lsn + 0x38) if last else None
    return Batch(txn, stamped, last, end)


def _batches(items: Iterable[Event | Batch]) -> list[Batch]:
    out: list[Batch] = []
    for item in items:
        out.append(item if isinstance(item, Batch) else make_batch(item))
    return out


async def dispatch(app: WalEx, *items: Event | Batch) -> None:
    """Run *app*'s handlers and destinations on each item, as the stream would.

    Each :class:`~walex.Event` is its own transaction; put several in one
    with :func:`make_batch`. Destinations receive what they would, but are
    not started or closed: pass test doubles.

    Raises:
        HandlerError: a handler kept failing under the ``"stop"`` policy.
    """
    for batch in _batches(items):
        await app.dispatch(batch)


def run_events(app: WalEx, *items: Event | Batch) -> None:
    """:func:`dispatch` for synchronous tests (runs its own event loop)."""
    asyncio.run(dispatch(app, *items))

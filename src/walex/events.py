"""What walex hands to users: :class:`Event` (one change) and :class:`Batch`.

This module owns the value types walex hands out and the one way events are
made; it does no I/O and knows nothing of the protocol.

An :class:`Event` is an immutable named tuple: cheap to make on the hot path,
safe to share. Per-transaction facts (xid, commit LSN and time) live once in a
:class:`Transaction` that every event of it points to, and per-table facts
(schema, table, column types, primary key) once in a :class:`Source`. The
diff of an update (:attr:`Event.changes`) is computed when asked for.

The identity of a change, :attr:`Event.id`, is ``"<commit LSN>:<seq>"``: the
commit LSN of its transaction and its index in it. It is the same every time
the change is delivered, so it is the key to deduplicate on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple

from .lsn import LSN

__all__ = [
    "Batch",
    "Event",
    "EventType",
    "Source",
    "Transaction",
    "message_event",
    "row_event",
    "truncate_event",
]

EventType = Literal["insert", "update", "delete", "truncate", "message"]

_NO_COLUMNS: frozenset[str] = frozenset()

REPLICA_IDENTITY = {"d": "default", "n": "nothing", "f": "full", "i": "index"}


@dataclass(frozen=True, slots=True)
class Source:
    """Where a change comes from: one table, as the server described it.

    A new :class:`Source` is made each time the server sends a Relation
    message for the table (after ``ALTER TABLE``, and once per connection).

    Attributes:
        database: the database name.
        schema: the table's schema.
        table: the table's name.
        columns: column name → type name (``"integer"``, ``"text[]"``, ...),
            in the table's column order.
        primary_key: the primary-key column names, empty when there is none.
        replica_identity: ``"default"``, ``"full"``, ``"index"`` or ``"nothing"``
            (what the old row of an update or delete carries).
        identity_columns: the columns the server sends for the old row
            under the table's replica identity (all of them for ``full``).
        relation_oid: the table's OID.
    """

    database: str
    schema: str
    table: str
    columns: Mapping[str, str]
    primary_key: tuple[str, ...]
    replica_identity: str
    identity_columns: tuple[str, ...]
    relation_oid: int

    @property
    def name(self) -> str:
        """``"schema.table"``."""
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True, slots=True)
class Transaction:
    """The transaction a change belongs to.

    Attributes:
        xid: the transaction id (0 for a message sent outside a transaction).
        commit_lsn: the LSN of the commit record (known from the start of
            the transaction on).
        commit_timestamp: the commit time, timezone-aware.
        origin: the replication origin the transaction came from, if any.
        gid: the global id, for a transaction committed with COMMIT PREPARED.
    """

    xid: int
    commit_lsn: LSN
    commit_timestamp: datetime
    origin: str | None = None
    gid: str | None = None


class Event(NamedTuple):
    """One change: a row inserted, updated or deleted, a table truncated, or
    a logical message (``pg_logical_emit_message``).

    Attributes:
        type: ``"insert"``, ``"update"``, ``"delete"``, ``"truncate"`` or ``"message"``.
        source: the table (``None`` for messages).
        new_record: the new row, column → value (insert, update).
        old_record: the old row as the server sent it (update, delete), or
            ``None``. Under ``REPLICA IDENTITY FULL`` it is the whole row;
            under DEFAULT or USING INDEX only the key columns, and for an
            update only when the key changed; under NOTHING never.
        unchanged_toast: columns whose value did not change and was too large
            to send (TOAST). They are missing from ``new_record`` unless the
            old row carried them.
        lsn: the WAL position of the change itself.
        seq: the change's index in its transaction, from 0.
        transaction: the transaction (xid, commit LSN and time).
        prefix: a message's prefix.
        content: a message's content.
        transactional: whether a message was sent inside a transaction.
        truncated: for truncate, every table the statement truncated
            (``"schema.table"``).
        cascade: a truncate with CASCADE.
        restart_identity: a truncate with RESTART IDENTITY.
    """

    type: EventType
    source: Source | None
    new_record: dict[str, Any] | None
    old_record: dict[str, Any] | None
    unchanged_toast: frozenset[str]
    lsn: LSN
    seq: int
    transaction: Transaction
    prefix: str | None = None
    content: bytes | None = None
    transactional: bool | None = None
    truncated: tuple[str, ...] = ()
    cascade: bool = False
    restart_identity: bool = False

    @property
    def schema(self) -> str | None:
        """The table's schema (``None`` for messages)."""
        return self.source.schema if self.source is not None else None

    @property
    def table(self) -> str | None:
        """The table's name (``None`` for messages)."""
        return self.source.table if self.source is not None else None

    @property
    def xid(self) -> int:
        """The transaction id."""
        return self.transaction.xid

    @property
    def commit_lsn(self) -> LSN:
        """The LSN of the transaction's commit."""
        return self.transaction.commit_lsn

    @property
    def commit_timestamp(self) -> datetime:
        """The transaction's commit time (timezone-aware)."""
        return self.transaction.commit_timestamp

    @property
    def id(self) -> str:
        """The idempotency key: ``"<commit LSN>:<seq>"``, stable across replays."""
        return f"{self.transaction.commit_lsn}:{self.seq}"

    @property
    def changes(self) -> dict[str, tuple[Any, Any]] | None:
        """For an update, column → ``(old, new)`` for each column that differs.

        ``None`` when the old row is not known (replica identity other than
        FULL) and for other event types. Unchanged TOAST columns are never
        reported as changes.
        """
        if self.type != "update":
            return None
        old = self.old_record
        new = self.new_record
        src = self.source
        if old is None or new is None or src is None or src.replica_identity != "full":
            return None
        return {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}

    @property
    def record(self) -> dict[str, Any] | None:
        """The row the event is about: the new row, or the old one for a delete."""
        return self.new_record if self.new_record is not None else self.old_record


@dataclass(frozen=True, slots=True)
class Batch:
    """Changes of one transaction, in commit order.

    A transaction with more than ``max_batch_events`` changes arrives as
    several batches; :attr:`last` is true on its final one. The transaction is
    confirmed to the server only after its last batch has been handled.

    Attributes:
        transaction: xid, commit LSN and commit time.
        events: the changes, in the order the transaction made them.
        last: this batch ends its transaction.
        end_lsn: the end of the transaction's commit record, the position
            confirmed to the server once the batch is handled; known on the
            last batch only (``None`` on the others).
        size: the bytes of the pgoutput messages behind the batch: what
            bounds the memory that batches in flight hold.
    """

    transaction: Transaction
    events: list[Event] = field(default_factory=list)
    last: bool = True
    end_lsn: LSN | None = None
    size: int = 0

    @property
    def xid(self) -> int:
        """The transaction id."""
        return self.transaction.xid

    @property
    def commit_lsn(self) -> LSN:
        """The LSN of the transaction's commit."""
        return self.transaction.commit_lsn

    @property
    def commit_timestamp(self) -> datetime:
        """The transaction's commit time."""
        return self.transaction.commit_timestamp

    def __len__(self) -> int:
        return len(self.events)


# -- the one way events are made ------------------------------------------------
#
# Events are made on the hot path, so not through NamedTuple's keyword-taking
# __new__: tuple.__new__ on the fields in order. These three functions are the
# only places that know the field order (the C fast path, _accel/_speedups.c,
# builds row events the same way; tests compare the two).

_new = tuple.__new__
_new_lsn = int.__new__  # LSN(x) without the range check: the server's positions are valid
_NO_TOAST: frozenset[str] = frozenset()


def row_event(
    kind: str,
    source: Source,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    toast: frozenset[str],
    lsn: int,
    seq: int,
    txn: Transaction,
) -> Event:
    """An insert, update or delete event."""
    return _new(
        Event,
        (
            kind,
            source,
            new,
            old,
            toast,
            _new_lsn(LSN, lsn),
            seq,
            txn,
            None,
            None,
            None,
            (),
            False,
            False,
        ),
    )


def truncate_event(
    source: Source,
    lsn: int,
    seq: int,
    txn: Transaction,
    truncated: tuple[str, ...],
    cascade: bool,
    restart_identity: bool,
) -> Event:
    """The event of one table truncated by a TRUNCATE statement."""
    return _new(
        Event,
        (
            "truncate",
            source,
            None,
            None,
            _NO_TOAST,
            _new_lsn(LSN, lsn),
            seq,
            txn,
            None,
            None,
            None,
            truncated,
            cascade,
            restart_identity,
        ),
    )


def message_event(
    prefix: str, content: bytes, transactional: bool, lsn: int, seq: int, txn: Transaction
) -> Event:
    """A logical message event (``pg_logical_emit_message``)."""
    return _new(
        Event,
        (
            "message",
            None,
            None,
            None,
            _NO_TOAST,
            _new_lsn(LSN, lsn),
            seq,
            txn,
            prefix,
            content,
            transactional,
            (),
            False,
            False,
        ),
    )

"""The pgoutput messages, one named tuple each.

Data only: no decoding logic, no I/O.

Field names follow the Postgres documentation, "Logical Replication Message
Formats". LSNs are :class:`walex.LSN`; timestamps are the server's raw
microseconds since 2000-01-01 (``*_ts``), turned into datetimes only where
walex hands them to users.
"""

from __future__ import annotations

from typing import NamedTuple

from ..lsn import LSN

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "BeginPrepare",
    "Column",
    "Commit",
    "CommitPrepared",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Prepare",
    "Relation",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Update",
]


class _UnchangedToast:
    """The marker for a TOASTed value the server did not send (kind ``'u'``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = _UnchangedToast()


class TupleData(NamedTuple):
    """A row: one entry per column.

    ``values[i]`` is ``None`` (SQL NULL), :data:`UNCHANGED_TOAST`, or the raw
    bytes of the value. ``binary`` counts the values sent in binary format
    (kind ``'b'``), ``text`` those sent as text (kind ``'t'``) and ``toast``
    the unchanged TOAST markers (kind ``'u'``). Where both ``binary`` and
    ``text`` are non-zero, ``kinds`` has one letter per column, else it is
    empty.
    """

    values: list[bytes | _UnchangedToast | None]
    binary: int
    text: int
    toast: int = 0
    kinds: bytes = b""


class Begin(NamedTuple):
    final_lsn: LSN
    commit_ts: int
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: LSN
    end_lsn: LSN
    commit_ts: int


class Origin(NamedTuple):
    commit_lsn: LSN
    name: str


class Column(NamedTuple):
    flags: int  # 1: part of the replica identity key
    name: str
    type_oid: int
    type_modifier: int


class Relation(NamedTuple):
    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


class Type(NamedTuple):
    xid: int | None
    oid: int
    namespace: str
    name: str


class Insert(NamedTuple):
    xid: int | None
    relation_oid: int
    new: TupleData


class Update(NamedTuple):
    xid: int | None
    relation_oid: int
    old_kind: str | None  # 'K' key columns only, 'O' the whole old row, None: not sent
    old: TupleData | None
    new: TupleData


class Delete(NamedTuple):
    xid: int | None
    relation_oid: int
    old_kind: str  # 'K' or 'O'
    old: TupleData


class Truncate(NamedTuple):
    xid: int | None
    options: int  # 1: CASCADE, 2: RESTART IDENTITY
    relation_oids: tuple[int, ...]


class LogicalMessage(NamedTuple):
    xid: int | None
    transactional: bool
    lsn: LSN
    prefix: str
    content: bytes


class StreamStart(NamedTuple):
    xid: int
    first_segment: bool


class StreamStop(NamedTuple):
    pass


class StreamCommit(NamedTuple):
    xid: int
    flags: int
    commit_lsn: LSN
    end_lsn: LSN
    commit_ts: int


class StreamAbort(NamedTuple):
    xid: int
    subxid: int
    abort_lsn: LSN | None  # protocol 4 with parallel streaming only
    abort_ts: int | None


class BeginPrepare(NamedTuple):
    prepare_lsn: LSN
    end_lsn: LSN
    prepare_ts: int
    xid: int
    gid: str


class Prepare(NamedTuple):
    flags: int
    prepare_lsn: LSN
    end_lsn: LSN
    prepare_ts: int
    xid: int
    gid: str


class CommitPrepared(NamedTuple):
    flags: int
    commit_lsn: LSN
    end_lsn: LSN
    commit_ts: int
    xid: int
    gid: str


class RollbackPrepared(NamedTuple):
    flags: int
    prepare_end_lsn: LSN
    rollback_end_lsn: LSN
    prepare_ts: int
    rollback_ts: int
    xid: int
    gid: str


class StreamPrepare(NamedTuple):
    flags: int
    prepare_lsn: LSN
    end_lsn: LSN
    prepare_ts: int
    xid: int
    gid: str


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)

"""pgoutput messages from bytes: no I/O, no asyncio.

:func:`decode` reads one message (the payload of one XLogData frame).
:class:`Decoder` remembers the one piece of state the protocol has: whether
the messages are inside a streamed block (between Stream Start and Stream
Stop), where data messages carry the transaction id first.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .._accel import speedups
from ..errors import DecodeError
from ..lsn import LSN
from .messages import (
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    Update,
    _UnchangedToast,
)

__all__ = ["Decoder", "decode", "read_tuple"]

_u8 = struct.Struct(">B").unpack_from
_i16 = struct.Struct(">h").unpack_from
_i32 = struct.Struct(">i").unpack_from
_u32 = struct.Struct(">I").unpack_from
_q = struct.Struct(">Q").unpack_from
_qqq = struct.Struct(">QQq").unpack_from  # lsn, lsn, timestamp
_bqqq = struct.Struct(">BQQq").unpack_from  # flags, lsn, lsn, timestamp
_qqi = struct.Struct(">Qqi").unpack_from  # lsn, timestamp, xid

_T, _B, _N, _U = ord("t"), ord("b"), ord("n"), ord("u")
_STREAM_STOP = StreamStop()
_tnew = tuple.__new__  # a named tuple without its Python-level __new__


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode(), end + 1


def read_tuple(data: bytes, pos: int) -> tuple[TupleData, int]:
    """Read TupleData at *pos*; return it and the position after it."""
    (ncols,) = _i16(data, pos)
    if ncols < 0:
        raise DecodeError("negative column count in tuple data")
    start = pos = pos + 2
    values: list[bytes | _UnchangedToast | None] = []
    append = values.append
    nbin = ntext = ntoast = 0
    for _ in range(ncols):
        kind = data[pos]
        if kind in (_T, _B):
            (size,) = _i32(data, pos + 1)
            if size < 0:
                raise DecodeError("negative value length in tuple data")
            pos += 5
            append(data[pos : pos + size])
            pos += size
            if kind == _T:
                ntext += 1
            else:
                nbin += 1
        elif kind == _N:
            append(None)
            pos += 1
        elif kind == _U:
            append(UNCHANGED_TOAST)
            pos += 1
            ntoast += 1
        else:
            raise DecodeError(f"unknown tuple value kind {chr(kind)!r} in column {len(values)}")
    if pos > len(data):
        raise DecodeError("tuple data runs past the end of the message")
    if nbin and ntext:
        return TupleData(values, nbin, ntext, ntoast, _kinds(data, start, ncols)), pos
    return TupleData(values, nbin, ntext, ntoast), pos


read_tuple_py = read_tuple
if speedups is not None:
    read_tuple = speedups.read_tuple


def _kinds(data: bytes, pos: int, ncols: int) -> bytes:
    # Rare: a row that mixes text and binary values (binary mode, with a type
    # that has no binary output). Walk it again to note each column's kind.
    out = bytearray()
    for _ in range(ncols):
        kind = data[pos]
        out.append(kind)
        pos += 5 + _i32(data, pos + 1)[0] if kind in (_T, _B) else 1
    return bytes(out)


def _relation(data: bytes, pos: int, xid: int | None) -> Relation:
    (oid,) = _u32(data, pos)
    namespace, pos = _string(data, pos + 4)
    name, pos = _string(data, pos)
    ident = chr(data[pos])
    (ncols,) = _i16(data, pos + 1)
    pos += 3
    cols = []
    for _ in range(ncols):
        flags = data[pos]
        colname, pos = _string(data, pos + 1)
        typoid, typmod = struct.unpack_from(">Ii", data, pos)
        pos += 8
        cols.append(Column(flags, colname, typoid, typmod))
    _end(data, pos)
    # An empty namespace means pg_catalog (the protocol saves the bytes).
    return Relation(xid, oid, namespace or "pg_catalog", name, ident, tuple(cols))


def _end(data: bytes, pos: int) -> None:
    if pos != len(data):
        raise DecodeError(f"{len(data) - pos} unexpected bytes at the end of the message")


def _insert(data: bytes, pos: int, xid: int | None) -> Insert:
    (relid,) = _u32(data, pos)
    if data[pos + 4] != 78:  # 'N'
        raise DecodeError("insert without a new tuple")
    tup, pos = read_tuple(data, pos + 5)
    _end(data, pos)
    return _tnew(Insert, (xid, relid, tup))


def _update(data: bytes, pos: int, xid: int | None) -> Update:
    (relid,) = _u32(data, pos)
    pos += 4
    kind = chr(data[pos])
    old = None
    old_kind = None
    if kind in ("K", "O"):
        old_kind = kind
        old, pos = read_tuple(data, pos + 1)
        kind = chr(data[pos])
    if kind != "N":
        raise DecodeError(f"update with tuple marker {kind!r}, expected 'N'")
    new, pos = read_tuple(data, pos + 1)
    _end(data, pos)
    return _tnew(Update, (xid, relid, old_kind, old, new))


def _delete(data: bytes, pos: int, xid: int | None) -> Delete:
    (relid,) = _u32(data, pos)
    kind = chr(data[pos + 4])
    if kind not in ("K", "O"):
        raise DecodeError(f"delete with tuple marker {kind!r}, expected 'K' or 'O'")
    old, pos = read_tuple(data, pos + 5)
    _end(data, pos)
    return _tnew(Delete, (xid, relid, kind, old))


def _truncate(data: bytes, pos: int, xid: int | None) -> Truncate:
    (n,) = _i32(data, pos)
    options = data[pos + 4]
    pos += 5
    oids = struct.unpack_from(f">{n}I", data, pos)
    _end(data, pos + 4 * n)
    return Truncate(xid, options, oids)


def _message(data: bytes, pos: int, xid: int | None) -> LogicalMessage:
    flags = data[pos]
    (lsn,) = _q(data, pos + 1)
    prefix, pos = _string(data, pos + 9)
    (size,) = _i32(data, pos)
    pos += 4
    content = data[pos : pos + size]
    _end(data, pos + size)
    return LogicalMessage(xid, bool(flags & 1), LSN(lsn), prefix, content)


def _type(data: bytes, pos: int, xid: int | None) -> Type:
    (oid,) = _u32(data, pos)
    namespace, pos = _string(data, pos + 4)
    name, pos = _string(data, pos)
    _end(data, pos)
    return Type(xid, oid, namespace or "pg_catalog", name)


_WITH_XID: dict[int, Callable[[bytes, int, int | None], Message]] = {
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("R"): _relation,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("Y"): _type,
}


def _begin(data: bytes, at: int) -> Begin:
    lsn, ts, xid = _qqi(data, at + 1)
    _end(data, at + 21)
    return Begin(LSN(lsn), ts, xid & 0xFFFFFFFF)


def _commit(data: bytes, at: int) -> Commit:
    flags, lsn, end, ts = _bqqq(data, at + 1)
    _end(data, at + 26)
    return Commit(flags, LSN(lsn), LSN(end), ts)


def _origin(data: bytes, at: int) -> Origin:
    (lsn,) = _q(data, at + 1)
    name, pos = _string(data, at + 9)
    _end(data, pos)
    return Origin(LSN(lsn), name)


def _stream_start(data: bytes, at: int) -> StreamStart:
    (xid,) = _u32(data, at + 1)
    _end(data, at + 6)
    return StreamStart(xid, data[at + 5] == 1)


def _stream_stop(data: bytes, at: int) -> StreamStop:
    _end(data, at + 1)
    return _STREAM_STOP


def _stream_commit(data: bytes, at: int) -> StreamCommit:
    (xid,) = _u32(data, at + 1)
    flags, lsn, end, ts = _bqqq(data, at + 5)
    _end(data, at + 30)
    return StreamCommit(xid, flags, LSN(lsn), LSN(end), ts)


def _stream_abort(data: bytes, at: int) -> StreamAbort:
    xid, subxid = struct.unpack_from(">II", data, at + 1)
    if len(data) - at == 9:
        return StreamAbort(xid, subxid, None, None)
    lsn, ts = struct.unpack_from(">Qq", data, at + 9)
    _end(data, at + 25)
    return StreamAbort(xid, subxid, LSN(lsn), ts)


def _prepare_like(data: bytes, at: int) -> tuple[int, LSN, LSN, int, int, str]:
    flags, lsn, end, ts = _bqqq(data, at + 1)
    (xid,) = _u32(data, at + 26)
    gid, pos = _string(data, at + 30)
    _end(data, pos)
    return flags, LSN(lsn), LSN(end), ts, xid, gid


def _begin_prepare(data: bytes, at: int) -> BeginPrepare:
    lsn, end, ts = _qqq(data, at + 1)
    (xid,) = _u32(data, at + 25)
    gid, pos = _string(data, at + 29)
    _end(data, pos)
    return BeginPrepare(LSN(lsn), LSN(end), ts, xid, gid)


def _prepare(data: bytes, at: int) -> Prepare:
    return Prepare(*_prepare_like(data, at))


def _commit_prepared(data: bytes, at: int) -> CommitPrepared:
    return CommitPrepared(*_prepare_like(data, at))


def _stream_prepare(data: bytes, at: int) -> StreamPrepare:
    return StreamPrepare(*_prepare_like(data, at))


def _rollback_prepared(data: bytes, at: int) -> RollbackPrepared:
    flags, end1, end2, ts1, ts2, xid = struct.unpack_from(">BQQqqI", data, at + 1)
    gid, pos = _string(data, at + 38)
    _end(data, pos)
    return RollbackPrepared(flags, LSN(end1), LSN(end2), ts1, ts2, xid, gid)


_PLAIN: dict[int, Callable[[bytes, int], Message]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("S"): _stream_start,
    ord("E"): _stream_stop,
    ord("c"): _stream_commit,
    ord("A"): _stream_abort,
    ord("b"): _begin_prepare,
    ord("P"): _prepare,
    ord("K"): _commit_prepared,
    ord("r"): _rollback_prepared,
    ord("p"): _stream_prepare,
}


def decode(data: bytes, in_stream: bool = False, offset: int = 0) -> Message:
    """Decode one pgoutput message.

    Args:
        data: the message, starting with its type byte at *offset*.
        in_stream: the message sits between Stream Start and Stream Stop,
            where data messages begin with the (sub)transaction id.
        offset: where the message starts in *data* (the rest of *data*
            is the message: nothing may follow it).

    Raises:
        DecodeError: the bytes are not a pgoutput message walex knows.
    """
    if len(data) <= offset:
        raise DecodeError("empty pgoutput message")
    tag = data[offset]
    try:
        with_xid = _WITH_XID.get(tag)
        if with_xid is not None:
            if in_stream:
                return with_xid(data, offset + 5, _u32(data, offset + 1)[0])
            return with_xid(data, offset + 1, None)
        plain = _PLAIN.get(tag)
        if plain is not None:
            return plain(data, offset)
    except DecodeError:
        raise
    except (struct.error, IndexError, ValueError) as exc:
        raise DecodeError(f"malformed {chr(tag)!r} message ({exc})") from exc
    raise DecodeError(f"unknown pgoutput message type {chr(tag)!r} (0x{tag:02x})")


class Decoder:
    """Decodes a sequence of messages, tracking streamed blocks."""

    __slots__ = ("in_stream",)

    def __init__(self) -> None:
        self.in_stream = False

    def decode(self, data: bytes) -> Message:
        """Decode the next message of the stream (see :func:`decode`)."""
        msg = decode(data, self.in_stream)
        if type(msg) is StreamStart:
            self.in_stream = True
        elif type(msg) is StreamStop:
            self.in_stream = False
        return msg

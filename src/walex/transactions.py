"""Transactions: replication frames in, batches of events out, in commit order.

:class:`Assembler` reads the walsender's frames (XLogData and keepalives),
decodes their pgoutput messages and turns the changes into
:class:`~walex.Event` objects, cut into :class:`~walex.Batch` objects of at
most ``max_batch_events`` events or ``max_batch_bytes`` bytes (a large
transaction is handed on in parts, as it arrives). Streamed in-progress
transactions (protocol 2+) and prepared transactions (two-phase) are spooled
to disk until their commit, then replayed as batches.

Its output is :attr:`Assembler.ready`: batches, and *positions* (an int: a
WAL position with no events that may be confirmed once everything before it
is handled: an empty transaction, a keepalive's WAL end while nothing is
open, a heartbeat).

It does no network I/O and knows no asyncio: the caller feeds
:attr:`Assembler.frames` and drains :attr:`Assembler.ready`. The one thing it
cannot do alone is describe a table it has not seen: :meth:`Assembler.step`
then returns the Relation message, and the caller looks the table up in the
catalog and hands the codec back with :meth:`Assembler.add_relation`. So it
is testable from captured frames (see ``tests/test_transactions.py``).
"""

from __future__ import annotations

import logging
import struct
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from ._accel import speedups
from .errors import DecodeError
from .events import Batch, Event, Transaction, message_event, row_event, truncate_event
from .lsn import LSN
from .pgoutput.decoder import decode
from .pgoutput.messages import (
    Begin,
    BeginPrepare,
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
    Type,
    Update,
)
from .replication.framing import KEEPALIVE, XLOG_DATA, XLOG_HEADER, XLOG_PAYLOAD, parse_keepalive
from .values import RelationCodec

__all__ = ["HEARTBEAT_PREFIX", "Assembler"]

#: The prefix of the logical messages walex writes as heartbeats.
HEARTBEAT_PREFIX = "walex.heartbeat"

logger = logging.getLogger(__name__)

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_W, _K = XLOG_DATA, KEEPALIVE
_STREAM_STOP, _PREPARE = ord("E"), ord("P")
_RELATION_TAG = ord("R")
# The pgoutput message of an XLogData frame starts at byte 25 (written as a
# number below, where it is read per frame).
assert XLOG_PAYLOAD == 25
_SPOOL_RECORD = struct.Struct(">QI")
_NO_TOAST: frozenset[str] = frozenset()

# Plain transactions, Begin to Commit, frame to Batch, in C (None: pure Python).
_run_fast = speedups.run_transactions if speedups is not None else None
# What one trip through the C path may make: several small transactions
# share a trip, each its own Batch.
_MAX_READY = 256


def _timestamp(us: int) -> datetime:
    return _PG_EPOCH + timedelta(microseconds=us)


class _Spool:
    """A transaction kept on disk until it commits (streamed or prepared)."""

    def __init__(self, directory: str | None, in_stream: bool) -> None:
        # Closed by close(), when the transaction is handed on or dropped.
        self.file: IO[bytes] = tempfile.TemporaryFile(  # noqa: SIM115
            prefix="walex-spool-", dir=directory
        )
        self.in_stream = in_stream  # records carry the (sub)transaction id
        self.aborted: set[int] = set()
        self.relations_applied = False
        self.count = 0

    def write(self, lsn: int, payload: bytes) -> None:
        self.file.write(_SPOOL_RECORD.pack(lsn, len(payload)))
        self.file.write(payload)
        self.count += 1

    def records(self) -> Iterator[tuple[int, bytes]]:
        f = self.file
        f.flush()
        f.seek(0)
        size = _SPOOL_RECORD.size
        while True:
            head = f.read(size)
            if not head:
                return
            lsn, n = _SPOOL_RECORD.unpack(head)
            yield lsn, f.read(n)

    def close(self) -> None:
        self.file.close()


class _Replay:
    """A spooled transaction being handed on after its commit."""

    __slots__ = ("end_lsn", "records", "spool")

    def __init__(self, spool: _Spool, end_lsn: LSN) -> None:
        self.spool = spool
        self.records = spool.records()
        self.end_lsn = end_lsn


class Assembler:
    """Frames → batches of events, one transaction after another.

    Args:
        max_batch_events: the most events in one batch.
        max_batch_bytes: the most message bytes behind one batch.
        spool_dir: where streamed and prepared transactions are spooled
            (``None``: the system's temporary directory).

    Attributes:
        frames: the frames to read (the caller appends, the assembler takes).
        ready: what is ready to hand on, in order: batches and positions.
        relations: the codec of each table the server described, by OID.
        holds: the prepare LSN of each prepared, uncommitted transaction, by
            gid: positions the checkpoint must not confirm past.
        received: the newest WAL position read.
        server_wal_end: the server's WAL end, as of its last message.
        reply_requested: the server asked for a status update (keepalive);
            the caller sends one and clears it.
    """

    def __init__(
        self, *, max_batch_events: int, max_batch_bytes: int, spool_dir: str | None = None
    ) -> None:
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self._spool_dir = spool_dir
        self.frames: deque[bytes] = deque()
        self.ready: deque[Batch | int] = deque()
        self.relations: dict[int, RelationCodec] = {}
        # What the C fast path needs of each table (see _speedups.run_transactions).
        self._fast: dict[int, tuple[Any, ...]] = {}
        self.holds: dict[object, int] = {}
        self.received = 0
        self.server_wal_end = 0
        self.reply_requested = False
        self.heartbeats_received = 0
        self.last_heartbeat: float | None = None  # time.monotonic() of the last one
        self.last_heartbeat_lsn: LSN | None = None

        self._txn: Transaction | None = None
        self._events: list[Event] = []
        self._seq = 0
        self._batch_bytes = 0  # wire size of the changes in the batch being built
        self._clock = 0
        self._need: Relation | None = None  # a table to describe before going on
        self._stream_spool: _Spool | None = None
        self._spools: dict[int, _Spool] = {}
        self._prepare_spool: _Spool | None = None
        self._prepare_gid: str | None = None
        self._prepared: dict[str, _Spool] = {}
        self._replay: _Replay | None = None
        self._relations_todo: tuple[_Spool, Iterator[tuple[int, bytes]]] | None = None

    # -- the caller's side ---------------------------------------------------

    @property
    def idle(self) -> bool:
        """Whether no transaction is open or being replayed."""
        return (
            self._txn is None
            and self._replay is None
            and self._prepare_spool is None
            and self._need is None
        )

    def step(self) -> Relation | None:
        """Read frames until something is ready or the frames run out.

        Returns:
            A Relation message when a table must be described first: look it
            up and call :meth:`add_relation` before the next step (if that
            fails, the next step returns the same message again). ``None``
            otherwise.

        Raises:
            DecodeError: a frame or message walex cannot read.
        """
        ready = self.ready
        while not ready:
            if self._need is not None:
                return self._need
            if self._relations_todo is not None:
                self._apply_spooled_relations()
            elif self._replay is not None:
                self._replay_some()
            elif self.frames:
                self._consume()
            else:
                return None
        return self._need

    def add_relation(self, codec: RelationCodec) -> None:
        """Install the codec of the table the last :meth:`step` asked about."""
        self._need = None
        oid = codec.source.relation_oid
        self.relations[oid] = codec
        self._fast[oid] = codec.fast_path()

    def reset(self) -> None:
        """Drop everything received but not handed on: the server sends it again."""
        self.frames.clear()
        self.ready.clear()
        self._txn = None
        self._events = []
        self._need = None
        self._drop_spools()

    def close(self) -> None:
        """Remove the spool files."""
        self._drop_spools()

    def _drop_spools(self) -> None:
        for spool in [*self._spools.values(), *self._prepared.values()]:
            spool.close()
        if self._prepare_spool is not None:
            self._prepare_spool.close()
        if self._replay is not None:
            self._replay.spool.close()
        self._spools.clear()
        self._prepared.clear()
        self.holds.clear()
        self._prepare_spool = self._stream_spool = None
        self._prepare_gid = None
        self._replay = None
        self._relations_todo = None

    # -- frames ----------------------------------------------------------------

    def _consume(self) -> None:
        frames = self.frames
        ready = self.ready
        header = XLOG_HEADER.unpack_from
        while (
            frames
            and not ready
            and self._replay is None
            and self._need is None
            and self._relations_todo is None
        ):
            if _run_fast is not None and self._stream_spool is None and self._prepare_spool is None:
                # Plain transactions, frame to Batch, all in C, until the
                # first frame it leaves to the code below.
                state: list[Any] = [
                    self._txn,
                    self._seq,
                    self._events,
                    self._batch_bytes,
                    self.received,
                    self.server_wal_end,
                    self._clock,
                ]
                taken = _run_fast(
                    frames,
                    self._fast,
                    ready,
                    state,
                    self.max_batch_events,
                    self.max_batch_bytes,
                    _MAX_READY,
                )
                if taken:
                    (
                        self._txn,
                        self._seq,
                        self._events,
                        self._batch_bytes,
                        self.received,
                        self.server_wal_end,
                        self._clock,
                    ) = state
                    continue
            frame = frames.popleft()
            tag = frame[0]
            if tag == _W:
                self._batch_bytes += len(frame)
                lsn, wal_end, clock = header(frame, 1)
                self._clock = clock
                if wal_end > self.server_wal_end:
                    self.server_wal_end = wal_end
                if lsn > self.received:
                    self.received = lsn
                if self._stream_spool is not None:
                    if frame[25] == _STREAM_STOP:
                        self._stream_spool = None
                    else:
                        self._stream_spool.write(lsn, frame[25:])
                    continue
                if self._prepare_spool is not None and frame[25] != _RELATION_TAG:
                    if frame[25] == _PREPARE:
                        self._on_prepare(self._decode(frame, lsn, False, 25))  # type: ignore[arg-type]
                    else:
                        self._prepare_spool.write(lsn, frame[25:])
                    continue
                msg = self._decode(frame, lsn, False, 25)
                if self._on_change(msg, lsn):
                    continue
                if type(msg) is Relation:
                    self._need = msg
                else:
                    self._on_other(msg, lsn)
            elif tag == _K:
                wal_end, _clock, reply = parse_keepalive(frame)
                if wal_end > self.server_wal_end:
                    self.server_wal_end = wal_end
                if wal_end > self.received:
                    self.received = wal_end
                if self.idle:
                    # Everything before wal_end has been read, and none of it
                    # is an open transaction: once what is queued before is
                    # handled, nothing of ours lies behind it.
                    ready.append(wal_end)
                if reply:
                    self.reply_requested = True
            else:
                raise DecodeError(
                    f"unknown replication frame type {chr(tag)!r}", LSN(self.received)
                )

    def _decode(self, data: bytes, lsn: int, in_stream: bool = False, offset: int = 0) -> Message:
        try:
            return decode(data, in_stream, offset)
        except DecodeError as exc:
            raise DecodeError(str(exc), LSN(lsn)) from exc

    # -- changes -----------------------------------------------------------------

    def _codec(self, oid: int, lsn: int) -> RelationCodec:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(
                f"a change for relation OID {oid}, which the server never described", LSN(lsn)
            ) from None

    def _push(self, event: Event) -> None:
        self._events.append(event)
        self._seq += 1
        assert self._txn is not None
        self._cut_if_full(self._txn)

    def _cut_if_full(self, txn: Transaction) -> None:
        """Hand on the batch being built once it holds enough events or bytes."""
        if len(self._events) >= self.max_batch_events or self._batch_bytes >= self.max_batch_bytes:
            self.ready.append(Batch(txn, self._events, False, None, self._batch_bytes))
            self._events = []
            self._batch_bytes = 0

    def _on_change(self, msg: Message, lsn: int) -> bool:
        """Handle a row change, truncate or logical message; False for others."""
        t = type(msg)
        if t is Insert:
            self._on_insert(msg, lsn)  # type: ignore[arg-type]
        elif t is Update:
            self._on_update(msg, lsn)  # type: ignore[arg-type]
        elif t is Delete:
            self._on_delete(msg, lsn)  # type: ignore[arg-type]
        elif t is Truncate:
            self._on_truncate(msg, lsn)  # type: ignore[arg-type]
        elif t is LogicalMessage:
            self._on_message(msg, lsn)  # type: ignore[arg-type]
        else:
            return False
        return True

    def _no_txn(self, lsn: int) -> DecodeError:
        return DecodeError("a change outside a transaction", LSN(lsn))

    def _on_insert(self, msg: Insert, lsn: int) -> None:
        txn = self._txn
        if txn is None:
            raise self._no_txn(lsn)
        codec = self._codec(msg.relation_oid, lsn)
        new, toast = codec.load(msg.new)
        self._push(row_event("insert", codec.source, new, None, toast, lsn, self._seq, txn))

    def _on_update(self, msg: Update, lsn: int) -> None:
        txn = self._txn
        if txn is None:
            raise self._no_txn(lsn)
        codec = self._codec(msg.relation_oid, lsn)
        new, toast = codec.load(msg.new)
        old: dict[str, Any] | None = None
        if msg.old is not None:
            if msg.old_kind == "O":
                old, _ = codec.load(msg.old)
            else:
                old = codec.load_key(msg.old)
        if toast and old is not None and msg.old_kind == "O":
            # REPLICA IDENTITY FULL: the old row has the unchanged values.
            filled = [c for c in toast if c in old]
            for c in filled:
                new[c] = old[c]
            toast = toast.difference(filled)
        self._push(row_event("update", codec.source, new, old, toast, lsn, self._seq, txn))

    def _on_delete(self, msg: Delete, lsn: int) -> None:
        txn = self._txn
        if txn is None:
            raise self._no_txn(lsn)
        codec = self._codec(msg.relation_oid, lsn)
        old = codec.load(msg.old)[0] if msg.old_kind == "O" else codec.load_key(msg.old)
        self._push(row_event("delete", codec.source, None, old, _NO_TOAST, lsn, self._seq, txn))

    def _on_truncate(self, msg: Truncate, lsn: int) -> None:
        txn = self._txn
        if txn is None:
            raise self._no_txn(lsn)
        sources = [self._codec(oid, lsn).source for oid in msg.relation_oids]
        names = tuple(s.name for s in sources)
        cascade = bool(msg.options & 1)
        restart = bool(msg.options & 2)
        for source in sources:
            self._push(truncate_event(source, lsn, self._seq, txn, names, cascade, restart))

    def _on_message(self, msg: LogicalMessage, lsn: int) -> None:
        txn = self._txn
        if msg.transactional and txn is not None:
            self._push(message_event(msg.prefix, msg.content, True, msg.lsn, self._seq, txn))
            return
        if msg.prefix == HEARTBEAT_PREFIX and not msg.transactional:
            self.heartbeats_received += 1
            self.last_heartbeat = time.monotonic()
            self.last_heartbeat_lsn = msg.lsn
            self.ready.append(msg.lsn)
            return
        # Outside a transaction: a batch of its own, confirmed once handled.
        own = Transaction(0, msg.lsn, _timestamp(self._clock))
        event = message_event(msg.prefix, msg.content, msg.transactional, msg.lsn, 0, own)
        self.ready.append(Batch(own, [event], True, msg.lsn, len(msg.content)))

    # -- transaction boundaries ------------------------------------------------------

    def _begin(self, txn: Transaction) -> None:
        if self._txn is not None:
            raise DecodeError("a transaction began inside another", txn.commit_lsn)
        self._txn = txn
        self._events = []
        self._seq = 0
        self._batch_bytes = 0

    def _end(self, end_lsn: LSN) -> None:
        txn = self._txn
        if txn is None:
            raise DecodeError("a commit without a transaction", end_lsn)
        if self._seq:
            self.ready.append(Batch(txn, self._events, True, end_lsn, self._batch_bytes))
        else:
            self.ready.append(end_lsn)
        self._events = []
        self._txn = None
        self._batch_bytes = 0

    def _on_other(self, msg: Message, lsn: int) -> None:
        t = type(msg)
        m: Any = msg
        if t is Begin:
            self._begin(Transaction(m.xid, m.final_lsn, _timestamp(m.commit_ts)))
        elif t is Commit:
            self._end(m.end_lsn)
        elif t is Origin:
            if self._txn is not None and not self._seq:
                txn = self._txn
                self._txn = Transaction(
                    txn.xid, txn.commit_lsn, txn.commit_timestamp, m.name, txn.gid
                )
        elif t is Type:
            pass  # types are looked up in the catalog when a relation uses them
        elif t is StreamStart:
            spool = self._spools.get(m.xid)
            if spool is None:
                spool = self._spools[m.xid] = _Spool(self._spool_dir, in_stream=True)
            self._stream_spool = spool
        elif t is StreamStop:
            self._stream_spool = None
        elif t is StreamCommit:
            spool = self._spools.pop(m.xid, None)
            if spool is None:
                raise DecodeError(f"stream commit of unknown transaction {m.xid}", LSN(lsn))
            self._begin(Transaction(m.xid, m.commit_lsn, _timestamp(m.commit_ts)))
            self._replay = _Replay(spool, m.end_lsn)
        elif t is StreamAbort:
            if m.subxid == m.xid or m.subxid == 0:
                spool = self._spools.pop(m.xid, None)
                if spool is not None:
                    spool.close()
            elif m.xid in self._spools:
                self._spools[m.xid].aborted.add(m.subxid)
        elif t is BeginPrepare:
            self._prepare_spool = _Spool(self._spool_dir, in_stream=False)
            self._prepare_gid = m.gid
            self.holds[m.gid] = m.prepare_lsn
        elif t is StreamPrepare:
            spool = self._spools.pop(m.xid, None)
            if spool is None:
                raise DecodeError(f"stream prepare of unknown transaction {m.xid}", LSN(lsn))
            spool.relations_applied = True
            self._prepared[m.gid] = spool
            self.holds[m.gid] = m.prepare_lsn
            # The server counts the table descriptions inside a prepared
            # stream as delivered: later transactions rely on them.
            self._relations_todo = (spool, spool.records())
        elif t is CommitPrepared:
            spool = self._prepared.pop(m.gid, None)
            self.holds.pop(m.gid, None)
            txn = Transaction(m.xid, m.commit_lsn, _timestamp(m.commit_ts), None, m.gid)
            if spool is None:
                logger.warning(
                    "COMMIT PREPARED of %r whose PREPARE was not seen; it was delivered before",
                    m.gid,
                )
                self.ready.append(m.end_lsn)
            else:
                self._begin(txn)
                self._replay = _Replay(spool, m.end_lsn)
        elif t is RollbackPrepared:
            spool = self._prepared.pop(m.gid, None)
            self.holds.pop(m.gid, None)
            if spool is not None:
                spool.close()
            self.ready.append(m.rollback_end_lsn)
        elif t is Prepare:
            raise DecodeError("PREPARE without BEGIN PREPARE", LSN(lsn))
        else:  # pragma: no cover - decode() returns only the types above
            raise DecodeError(f"unexpected message {msg!r}", LSN(lsn))

    def _on_prepare(self, msg: Prepare) -> None:
        spool = self._prepare_spool
        assert spool is not None
        self._prepare_spool = None
        self._prepare_gid = None
        self._prepared[msg.gid] = spool

    # -- spooled transactions ----------------------------------------------------------

    def _apply_spooled_relations(self) -> None:
        assert self._relations_todo is not None
        spool, records = self._relations_todo
        # Applying a description twice is harmless: if this is interrupted,
        # it goes on from the next record.
        for lsn, payload in records:
            if payload[0] == _RELATION_TAG:
                msg = self._decode(payload, lsn, spool.in_stream)
                assert isinstance(msg, Relation)
                if msg.xid not in spool.aborted:
                    self._need = msg
                    return
        self._relations_todo = None

    def _replay_some(self) -> None:
        replay = self._replay
        assert replay is not None
        spool = replay.spool
        in_stream = spool.in_stream
        ready = self.ready
        for lsn, payload in replay.records:
            self._batch_bytes += len(payload)
            msg = self._decode(payload, lsn, in_stream)
            xid = getattr(msg, "xid", None)
            if in_stream and xid is not None and xid in spool.aborted:
                continue
            t = type(msg)
            if self._on_change(msg, lsn):
                pass
            elif t is Relation:
                if in_stream and not spool.relations_applied:
                    self._need = msg  # type: ignore[assignment]
                    return
            elif t in (Type, Origin):
                pass
            else:
                raise DecodeError(f"unexpected {type(msg).__name__} in a spooled transaction")
            if ready:
                return
        self._replay = None
        spool.close()
        self._end(replay.end_lsn)

"""The engine: :func:`connect` and :class:`Stream`.

A :class:`Stream` reads one replication slot and yields :class:`Batch` objects:
the changes of one transaction (or a bounded part of a large one), in commit
order. It is pull-driven: nothing is read from the server while the caller
handles a batch, so memory stays bounded whatever the backlog.

The delivery guarantee: asking for the next batch (or leaving the ``async
with`` block without an exception) marks the previous one handled. The
position reported to the server as flushed is the end of the newest
transaction whose batches, and those of every transaction before it, have
been handled. A crash replays at most the transactions not yet confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import secrets
import struct
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ._accel import speedups
from .admin import (
    SLOT_NAME,
    ServerFacts,
    connect_sql,
    connection_error,
    preflight,
    slot_info,
)
from .errors import (
    ConfigurationError,
    ConnectionFailed,
    DecodeError,
    NoFreeReplicationSlots,
    ServerNotReady,
    SlotInUse,
    SlotInvalidated,
    SlotLost,
    StreamError,
    WalexError,
)
from .events import Batch, Event, Source, Transaction
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
from .replication import (
    ReplicationConnection,
    ServerError,
    parse_keepalive,
    replication_conninfo,
)
from .values import RelationCodec, TypeResolver, has_binary_loader, make_adapters, make_source

__all__ = ["HEARTBEAT_PREFIX", "Stream", "connect"]

#: The prefix of the logical messages walex writes as heartbeats.
HEARTBEAT_PREFIX = "walex.heartbeat"

logger = logging.getLogger(__name__)

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_W, _K = ord("w"), ord("k")
_STREAM_STOP, _PREPARE = ord("E"), ord("P")
_RELATION_TAG = ord("R")
_XLOG_HEADER = struct.Struct(">QQq")
_SPOOL_RECORD = struct.Struct(">QI")
_NO_TOAST: frozenset[str] = frozenset()
_new_event = tuple.__new__
_row_events_fast = speedups.row_events if speedups is not None else None
_new_lsn = int.__new__  # LSN(x) without the range check: the server's positions are valid

# SQLSTATEs the server uses for a slot held by another process, a missing
# slot and a full slot table.
_OBJECT_IN_USE = "55006"
_UNDEFINED_OBJECT = "42704"
_DUPLICATE_OBJECT = "42710"
_CONFIG_LIMIT = "53400"


def _row_event(
    kind: str,
    source: Source,
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    toast: frozenset[str],
    lsn: int,
    seq: int,
    txn: Transaction,
) -> Event:
    """An insert, update or delete event, made without NamedTuple's slow __new__."""
    fields = (kind, source, new, old, toast, _new_lsn(LSN, lsn), seq, txn)
    return _new_event(Event, (*fields, None, None, None, (), False, False))


def _message_event(msg: LogicalMessage, seq: int, txn: Transaction) -> Event:
    """A logical message event (pg_logical_emit_message), made the same way."""
    fields = ("message", None, None, None, _NO_TOAST, msg.lsn, seq, txn)
    body = (msg.prefix, msg.content, msg.transactional)
    return _new_event(Event, (*fields, *body, (), False, False))


def _timestamp(us: int) -> datetime:
    return _PG_EPOCH + timedelta(microseconds=us)


class _TextModeNeeded(Exception):
    """Binary mode met a type it cannot read: reconnect in text mode."""


class _Mark:
    """A position to confirm once everything queued before it is handled."""

    __slots__ = ("lsn",)

    def __init__(self, lsn: int) -> None:
        self.lsn = lsn


class _Spool:
    """A transaction kept on disk until it commits (streamed or prepared)."""

    def __init__(self, directory: str | None, in_stream: bool) -> None:
        # Closed by close(), when the transaction is handed on or dropped.
        self.file: IO[bytes] = tempfile.TemporaryFile(  # noqa: SIM115
            prefix="walex-spool-", dir=directory
        )
        self.in_stream = in_stream  # records carry the (sub)transaction id
        self.aborted: set[int] = set()
        self.prepare_lsn: LSN | None = None
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

    __slots__ = ("end_lsn", "pushed_back", "records", "spool")

    def __init__(self, spool: _Spool, end_lsn: LSN) -> None:
        self.spool = spool
        self.records = spool.records()
        self.end_lsn = end_lsn
        self.pushed_back: list[tuple[int, bytes]] = []

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while self.pushed_back:
            yield self.pushed_back.pop()
        yield from self.records


def _transient(exc: ServerError) -> bool:
    """Whether a server error ends this connection only (retry) or the stream."""
    state = exc.sqlstate or ""
    return not state or state[:2] in ("08", "57", "53") or state == _OBJECT_IN_USE


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Stream:
    """A stream of changes from one replication slot. Make it with :func:`connect`.

    Iterate it with ``async for batch in stream``. The previous batch counts
    as handled when the next one is asked for, or when the ``async with``
    block ends without an exception.
    """

    def __init__(
        self,
        dsn: str,
        *,
        publication: str | Sequence[str],
        slot: str | None = None,
        durable: bool = False,
        create_slot: bool = True,
        start_lsn: LSN | str | None = None,
        binary: bool = False,
        streaming: bool = False,
        two_phase: bool = False,
        origin: Literal["none", "any"] | None = None,
        messages: bool = True,
        max_batch_events: int = 5000,
        max_batch_bytes: int = 64 << 20,
        status_interval: float = 10.0,
        allow_gap: bool = False,
        wait_for_slot: bool = True,
        standby_retry: float = 5.0,
        reconnect: bool = True,
        max_reconnect_delay: float = 30.0,
        connect_timeout: float = 30.0,
        spool_dir: str | os.PathLike[str] | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        if not isinstance(dsn, str):
            raise ConfigurationError("dsn must be a libpq connection string or URL (a str)")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"invalid connection string: {exc}") from None
        if "replication" in params:
            raise ConfigurationError("leave 'replication' out of the connection string")
        pubs = [publication] if isinstance(publication, str) else list(publication)
        if not pubs or not all(isinstance(p, str) and p for p in pubs):
            raise ConfigurationError(
                "publication must be a publication name or a non-empty list of names"
            )
        if slot is None:
            if durable:
                raise ConfigurationError(
                    "a durable slot needs a name: pass slot='my_app' (lower-case letters, "
                    "digits and underscores)"
                )
            slot = f"walex_tmp_{secrets.token_hex(6)}"
        if not isinstance(slot, str) or not SLOT_NAME.match(slot):
            raise ConfigurationError(
                f"slot name {slot!r} is not valid: use 1 to 63 lower-case letters, "
                "digits and underscores"
            )
        if origin not in (None, "none", "any"):
            raise ConfigurationError(f"origin must be 'none', 'any' or None, not {origin!r}")
        if not isinstance(max_batch_events, int) or max_batch_events < 1:
            raise ConfigurationError("max_batch_events must be a whole number of at least 1")
        if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
            raise ConfigurationError("max_batch_bytes must be a whole number of at least 1")
        if heartbeat_interval is not None and not heartbeat_interval > 0:
            raise ConfigurationError("heartbeat_interval must be a positive number of seconds")
        if not status_interval > 0:
            raise ConfigurationError("status_interval must be a positive number of seconds")
        if isinstance(start_lsn, str):
            try:
                start_lsn = LSN.parse(start_lsn)
            except ValueError as exc:
                raise ConfigurationError(f"start_lsn: {exc}") from None
        self._dsn = dsn
        self.publications = pubs
        self.slot = slot
        self.durable = durable
        self.create_slot = create_slot
        self._start_lsn = LSN(start_lsn or 0)
        self.binary = binary
        self.streaming = streaming
        self.two_phase = two_phase
        self.origin = origin
        self.messages = messages
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self._batch_bytes = 0  # wire size of the changes in the batch being built
        self.status_interval = status_interval
        self.allow_gap = allow_gap
        self.wait_for_slot = wait_for_slot
        self.standby_retry = standby_retry
        self.reconnect = reconnect
        self.max_reconnect_delay = max_reconnect_delay
        self.connect_timeout = connect_timeout
        self._spool_dir = os.fspath(spool_dir) if spool_dir is not None else None
        self.heartbeat_interval = heartbeat_interval
        self.heartbeats_sent = 0
        self.heartbeats_received = 0
        self.last_heartbeat: float | None = None  # time.monotonic() of the last one received
        self.last_heartbeat_lsn: LSN | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

        self._adapters = make_adapters()
        self._resolver = TypeResolver(self._adapters)
        self._catalog: psycopg.AsyncConnection[Any] | None = None
        self._conn: ReplicationConnection | None = None
        self._facts: ServerFacts | None = None
        self.protocol_version = 0
        self._relations: dict[int, RelationCodec] = {}
        # What the C fast path needs of each table (see _speedups.row_events).
        self._fast: dict[int, tuple[Any, ...]] = {}
        self._type_names: dict[tuple[int, int], str] = {}

        self._frames: deque[bytes] = deque()
        self._ready: deque[Batch | _Mark] = deque()
        self._inflight: Batch | None = None
        self._txn: Transaction | None = None
        self._events: list[Event] = []
        self._seq = 0
        self._stream_spool: _Spool | None = None
        self._spools: dict[int, _Spool] = {}
        self._prepare_spool: _Spool | None = None
        self._prepared: dict[str, _Spool] = {}
        self._replay: _Replay | None = None
        self._relations_todo: _Spool | None = None
        self._clock = 0

        self._handled = LSN(0)  # newest position whose changes are all handled
        self._confirmed = LSN(0)  # what we report: _handled, held before pending prepares
        self._received = 0
        self._server_wal_end = 0
        self._dirty = asyncio.Event()
        self._status_task: asyncio.Task[None] | None = None
        self._opened = False
        self._closed = False
        self.reconnects = 0
        self.status_updates = 0
        self._backend_pid: int | None = None
        #: True while a durable slot is held by another process and this
        #: stream waits as a standby.
        self.waiting_for_slot = False
        self._gc_paused = False
        self._binary_active = binary
        self._failures = 0  # connection losses since the last delivered batch

    # -- public state ----------------------------------------------------

    @property
    def confirmed_lsn(self) -> LSN:
        """The position reported to the server as flushed (handled)."""
        return self._confirmed

    @property
    def received_lsn(self) -> LSN:
        """The newest WAL position received from the server."""
        return LSN(self._received)

    @property
    def server_wal_end(self) -> LSN:
        """The server's WAL end, as of its last message."""
        return LSN(self._server_wal_end)

    @property
    def connected(self) -> bool:
        """Whether the replication connection is up."""
        return self._conn is not None and not self._conn.closed

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Stream:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self._mark_handled()
        await self.aclose()

    def __aiter__(self) -> Stream:
        return self

    async def open(self) -> None:
        """Check the server, open the slot and start streaming.

        Raises:
            ConnectionFailed, ServerNotReady, SlotError: each saying what to change.
        """
        if self._opened:
            return
        self._opened = True
        try:
            await self._open_catalog()
            await self._start_replication(first=True)
        except BaseException:
            await self._close_connections()
            raise
        loop = asyncio.get_running_loop()
        self._status_task = loop.create_task(self._status_loop())
        if self.heartbeat_interval is not None:
            self._heartbeat_task = loop.create_task(self._heartbeat_loop(self.heartbeat_interval))

    async def aclose(self) -> None:
        """Confirm what was handled, then close the connections."""
        if self._closed:
            return
        self._closed = True
        for task in (self._status_task, self._heartbeat_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(WalexError, OSError):
                conn.send_status(self._received, self._confirmed, self._confirmed)
                async with asyncio.timeout(5):
                    await conn.finish_sending()
        await self._close_connections()
        self._drop_spools()

    async def _drop_catalog(self) -> None:
        if self._catalog is not None:
            with contextlib.suppress(Exception):
                await self._catalog.close()
            self._catalog = None

    async def _close_connections(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._catalog is not None:
            with contextlib.suppress(Exception):
                await self._catalog.close()
            self._catalog = None

    def _drop_spools(self) -> None:
        for spool in [*self._spools.values(), *self._prepared.values()]:
            spool.close()
        if self._prepare_spool is not None:
            self._prepare_spool.close()
        if self._replay is not None:
            self._replay.spool.close()
        self._spools.clear()
        self._prepared.clear()
        self._prepare_spool = self._stream_spool = None
        self._replay = None

    # -- connecting ----------------------------------------------------------

    async def _open_catalog(self) -> psycopg.AsyncConnection[Any]:
        if self._catalog is None or self._catalog.closed:
            self._catalog = await connect_sql(self._dsn, self.connect_timeout)
        return self._catalog

    async def _start_replication(self, first: bool) -> None:
        catalog = await self._open_catalog()
        self._facts = facts = await preflight(
            catalog,
            publications=self.publications,
            slot=self.slot,
            durable=self.durable,
            create_slot=self.create_slot,
            binary=self.binary,
            streaming=self.streaming,
            two_phase=self.two_phase,
            origin=self.origin,
        )
        version = facts.version_num
        self.protocol_version = (
            4 if version >= 160000 else 3 if version >= 150000 else 2 if version >= 140000 else 1
        )
        if self._binary_active:
            with contextlib.suppress(_TextModeNeeded):
                await self._check_binary(catalog)
        if facts.slot is not None and facts.slot.active_pid is not None:
            if facts.slot.active_pid == self._backend_pid:
                await self._wait_for_old_walsender()
            else:
                await self._wait_for_slot(facts.slot.active_pid)
        conninfo = replication_conninfo(self._dsn)
        conn = await ReplicationConnection.connect(conninfo, self.connect_timeout)
        self._conn = conn
        self._backend_pid = conn.pgconn.backend_pid
        try:
            if facts.slot is None:
                if not self.durable and not first and not self.allow_gap:
                    raise SlotLost(
                        f"the temporary slot {self.slot!r} went away with its connection; "
                        "changes committed since then are not delivered. Use a durable slot "
                        "(durable=True) to resume without a gap, or pass allow_gap=True to "
                        "go on from now"
                    )
                if not self.durable and not first:
                    logger.warning(
                        "temporary slot %r was lost; going on from now (allow_gap=True): "
                        "changes committed while disconnected are not delivered",
                        self.slot,
                    )
                await self._create_slot(conn, version)
            await conn.start(self._start_command())
        except ServerError as exc:
            conn.close()
            self._conn = None
            raise self._translate(exc) from exc
        except BaseException:
            conn.close()
            self._conn = None
            raise
        logger.info(
            "streaming from slot %r (publication %s, protocol %d)",
            self.slot,
            ", ".join(self.publications),
            self.protocol_version,
        )

    async def _check_binary(self, catalog: psycopg.AsyncConnection[Any]) -> None:
        """Use text if a published column has a type psycopg cannot read in binary."""
        cur = await catalog.execute(
            """
            SELECT DISTINCT a.atttypid::int8
              FROM pg_publication_tables pt
              JOIN pg_namespace n ON n.nspname = pt.schemaname
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              JOIN pg_attribute a ON a.attrelid = c.oid
             WHERE pt.pubname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
            """,
            (self.publications,),
        )
        oids = [r[0] for r in await cur.fetchall()]
        await self._resolver.resolve(catalog, oids)
        self._require_binary_loaders(oids)

    def _require_binary_loaders(self, oids: Sequence[int]) -> None:
        missing = [o for o in oids if not has_binary_loader(self._adapters, o)]
        if missing:
            self._binary_active = False
            names = ", ".join(str(self._adapters.types.get(o) or o) for o in missing)
            logger.warning(
                "binary=True: the published tables have types psycopg cannot read in "
                "binary (%s); streaming in text instead, which gives the same values",
                names,
            )
            raise _TextModeNeeded(names)

    async def _wait_for_old_walsender(self) -> None:
        # The slot is still held by the server process of our own lost
        # connection; the server notices the loss within moments.
        for _ in range(100):
            await asyncio.sleep(0.1)
            info = await slot_info(await self._open_catalog(), self.slot)
            if info is None or info.active_pid != self._backend_pid:
                return
        raise SlotInUse(
            f"slot {self.slot!r} is still held by process {self._backend_pid} of the lost "
            "connection",
            self._backend_pid,
        )

    async def _wait_for_slot(self, pid: int) -> None:
        if not (self.durable and self.wait_for_slot):
            raise SlotInUse(
                f"slot {self.slot!r} is in use by server process {pid}; stop the other "
                "consumer, or use another slot name",
                pid,
            )
        logger.warning(
            "slot %r is in use by server process %s; waiting as a standby (checking every %gs)",
            self.slot,
            pid,
            self.standby_retry,
        )
        self.waiting_for_slot = True
        try:
            await self._standby(pid)
        finally:
            self.waiting_for_slot = False

    async def _standby(self, pid: int) -> None:
        waited = 0.0
        while True:
            await asyncio.sleep(self.standby_retry)
            waited += self.standby_retry
            catalog = await self._open_catalog()
            info = await slot_info(catalog, self.slot)
            if info is None or info.active_pid is None:
                logger.info("slot %r is free; taking over", self.slot)
                return
            pid = info.active_pid
            if waited >= 60:
                waited = 0.0
                logger.info("still waiting: slot %r is in use by process %s", self.slot, pid)

    async def _create_slot(self, conn: ReplicationConnection, version: int) -> None:
        temp = "" if self.durable else " TEMPORARY"
        if version >= 150000:
            opts = "SNAPSHOT 'nothing'" + (", TWO_PHASE true" if self.two_phase else "")
            cmd = (
                f"CREATE_REPLICATION_SLOT {_quote_ident(self.slot)}{temp} LOGICAL pgoutput ({opts})"
            )
        else:
            cmd = (
                f"CREATE_REPLICATION_SLOT {_quote_ident(self.slot)}{temp} LOGICAL pgoutput "
                "NOEXPORT_SNAPSHOT"
            )
        try:
            await conn.command(cmd)
        except ServerError as exc:
            if exc.sqlstate == _DUPLICATE_OBJECT and self.durable:
                return  # made meanwhile by another walex: fine, it is ours to share
            raise
        logger.info("created %s slot %r", "durable" if self.durable else "temporary", self.slot)

    def _start_command(self) -> str:
        pubs = ",".join(_quote_ident(p) for p in self.publications)
        options = [
            ("proto_version", str(self.protocol_version)),
            ("publication_names", pubs),
        ]
        if self.messages:
            options.append(("messages", "true"))
        if self._binary_active:
            options.append(("binary", "true"))
        if self.streaming:
            options.append(("streaming", "on"))
        if self.two_phase:
            options.append(("two_phase", "on"))
        if self.origin is not None:
            options.append(("origin", self.origin))
        opts = ", ".join(f"{k} {_quote_literal(v)}" for k, v in options)
        start = max(self._start_lsn, self._confirmed)
        return f"START_REPLICATION SLOT {_quote_ident(self.slot)} LOGICAL {start} ({opts})"

    def _translate(self, exc: ServerError) -> WalexError:
        msg = str(exc)
        if exc.sqlstate == _OBJECT_IN_USE:
            pid = re.search(r"PID (\d+)", msg)
            return SlotInUse(
                f"slot {self.slot!r} is in use by another process: {msg}",
                int(pid.group(1)) if pid else None,
            )
        if exc.sqlstate == _CONFIG_LIMIT:
            return NoFreeReplicationSlots(
                f"{msg}; drop unused slots or raise max_replication_slots / max_wal_senders"
            )
        if "can no longer get changes" in msg or "invalidated" in msg:
            return SlotInvalidated(
                f"{msg}; drop the slot and start again (re-read the tables if you need every row)"
            )
        if exc.sqlstate == _UNDEFINED_OBJECT and "publication" in msg:
            return ServerNotReady(f"{msg}; create the publication")
        if "number of requested standby connections exceeds" in msg:
            return ServerNotReady(f"{msg}; raise max_wal_senders and restart Postgres")
        return exc

    async def _reconnect(self, cause: BaseException) -> None:
        self._resume_gc()  # reconnecting can take long: let the collector run
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if not self.reconnect:
            raise StreamError(f"the replication connection broke: {cause}") from cause
        logger.warning("replication connection lost (%s); reconnecting", cause)
        # Whatever was received but not handled will be sent again.
        self._frames.clear()
        self._ready.clear()
        self._txn = None
        self._events = []
        self._drop_spools()
        self._failures += 1
        delay = 0.5
        if self._failures > 1:
            # The stream broke again before anything was delivered: back off.
            pause = min(0.5 * 2 ** (self._failures - 2), self.max_reconnect_delay)
            logger.warning("the stream keeps failing; waiting %.1fs before reconnecting", pause)
            await asyncio.sleep(pause)
        await self._drop_catalog()  # it most likely broke too
        while True:
            try:
                await self._start_replication(first=False)
                self.reconnects += 1
                logger.info("reconnected to slot %r", self.slot)
                return
            except (ConnectionFailed, StreamError, OSError, psycopg.OperationalError) as exc:
                if isinstance(exc, ServerError) and exc.sqlstate != _OBJECT_IN_USE:
                    raise
                await self._drop_catalog()
                logger.warning("reconnect failed (%s); retrying in %.1fs", exc, delay)
            except SlotInUse as exc:
                logger.warning("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay)

    # -- status updates ------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.status_interval):
                    await self._dirty.wait()
            self._dirty.clear()
            self._send_status()
            # Coalesce: at most a few updates a second, however fast we confirm.
            await asyncio.sleep(0.1)

    async def _heartbeat_loop(self, interval: float) -> None:
        # A message in this database's WAL moves the slot on even when only
        # other databases (or unpublished tables) change. walex swallows it.
        while True:
            await asyncio.sleep(interval)
            try:
                catalog = await self._open_catalog()
                await catalog.execute(
                    "SELECT pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,)
                )
                self.heartbeats_sent += 1
            except (WalexError, psycopg.Error) as exc:
                logger.warning("heartbeat not sent: %s", exc)
                await self._drop_catalog()

    def _send_status(self, reply: bool = False) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            conn.send_status(self._received, self._confirmed, self._confirmed, reply)
            self.status_updates += 1
        except WalexError as exc:
            logger.debug("status update not sent: %s", exc)

    def _confirm(self, lsn: int) -> None:
        if lsn > self._handled:
            self._handled = LSN(lsn)
        cap = self._handled
        for spool in self._prepared.values():
            if spool.prepare_lsn is not None and spool.prepare_lsn < cap:
                cap = spool.prepare_lsn
        if self._prepare_spool is not None and self._prepare_spool.prepare_lsn is not None:
            cap = min(cap, self._prepare_spool.prepare_lsn)
        if cap > self._confirmed:
            self._confirmed = LSN(cap)
            self._dirty.set()

    def _mark_handled(self) -> None:
        batch = self._inflight
        if batch is not None:
            self._inflight = None
            if batch.last and batch.end_lsn is not None:
                self._confirm(batch.end_lsn)

    # -- the iterator --------------------------------------------------------

    async def __anext__(self) -> Batch:
        self._mark_handled()
        if not self._opened:
            await self.open()
        if self._closed:
            raise StopAsyncIteration
        ready = self._ready
        while True:
            while ready:
                item = ready.popleft()
                if type(item) is _Mark:
                    self._confirm(item.lsn)
                    continue
                assert isinstance(item, Batch)
                self._inflight = item
                self._failures = 0
                return item
            await self._fill()

    async def _fill(self) -> None:
        """Read and decode until at least one batch or mark is ready."""
        # Decoding allocates many objects that reference counting frees; the
        # cyclic collector only slows it down (by a third, measured). Pause
        # it while filling one batch, but not while waiting for the server,
        # when the rest of the program runs.
        self._pause_gc()
        try:
            while not self._ready:
                try:
                    if self._replay is not None:
                        await self._replay_some()
                    elif self._frames:
                        await self._consume()
                    else:
                        await self._receive()
                except _TextModeNeeded as exc:
                    await self._reconnect(exc)
        finally:
            self._resume_gc()

    def _pause_gc(self) -> None:
        if gc.isenabled():
            gc.disable()
            self._gc_paused = True

    def _resume_gc(self) -> None:
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    async def _receive(self) -> None:
        conn = self._conn
        try:
            if conn is None:
                raise StreamError("not connected")
            while True:
                if not conn.read(self._frames):
                    raise StreamError("the server ended the replication stream")
                if self._frames:
                    return
                self._resume_gc()
                try:
                    await conn.wait_readable(None)
                finally:
                    self._pause_gc()
        except (StreamError, OSError) as exc:
            if isinstance(exc, ServerError):
                if "binary output function" in str(exc) and self._binary_active:
                    logger.warning("%s; streaming in text instead", exc)
                    self._binary_active = False
                elif not _transient(exc):
                    translated = self._translate(exc)
                    if isinstance(translated, ServerError):
                        raise StreamError(f"the server stopped the stream: {exc}") from exc
                    raise translated from exc
            await self._reconnect(exc)

    async def _consume(self) -> None:
        frames = self._frames
        ready = self._ready
        header = _XLOG_HEADER.unpack_from
        while frames and not ready and self._replay is None:
            txn = self._txn
            if (
                txn is not None
                and _row_events_fast is not None
                and self._stream_spool is None
                and self._prepare_spool is None
            ):
                # A run of plain row changes, frame to event, all in C.
                taken, self._batch_bytes, lsn, wal_end, clock = _row_events_fast(
                    frames,
                    self._fast,
                    txn,
                    self._seq,
                    self._events,
                    self.max_batch_events,
                    self.max_batch_bytes,
                    self._batch_bytes,
                )
                if taken:
                    self._seq += taken
                    self._clock = clock
                    if wal_end > self._server_wal_end:
                        self._server_wal_end = wal_end
                    if lsn > self._received:
                        self._received = lsn
                    self._cut_if_full(txn)
                    continue
            frame = frames.popleft()
            tag = frame[0]
            if tag == _W:
                self._batch_bytes += len(frame)
                lsn, wal_end, clock = header(frame, 1)
                self._clock = clock
                if wal_end > self._server_wal_end:
                    self._server_wal_end = wal_end
                if lsn > self._received:
                    self._received = lsn
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
                    try:
                        await self._on_relation(msg)
                    except BaseException:
                        # Cancelled (or failed) mid-lookup: read it again next time.
                        frames.appendleft(frame)
                        raise
                else:
                    self._on_other(msg, lsn)
                    if self._relations_todo is not None:
                        await self._apply_spooled_relations()
            elif tag == _K:
                wal_end, _clock, reply = parse_keepalive(frame)
                if wal_end > self._server_wal_end:
                    self._server_wal_end = wal_end
                if wal_end > self._received:
                    self._received = wal_end
                if self._idle():
                    # Everything before wal_end has been read and handled:
                    # nothing of ours lies behind it.
                    self._confirm(wal_end)
                if reply:
                    self._send_status()
            else:
                raise DecodeError(
                    f"unknown replication frame type {chr(tag)!r}", LSN(self._received)
                )

    def _idle(self) -> bool:
        return (
            self._txn is None
            and not self._ready
            and self._inflight is None
            and self._prepare_spool is None
            and self._replay is None
        )

    def _decode(self, data: bytes, lsn: int, in_stream: bool = False, offset: int = 0) -> Message:
        try:
            return decode(data, in_stream, offset)
        except DecodeError as exc:
            raise DecodeError(str(exc), LSN(lsn)) from exc

    # -- changes -------------------------------------------------------------

    def _codec(self, oid: int, lsn: int) -> RelationCodec:
        try:
            return self._relations[oid]
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
            self._ready.append(Batch(txn, self._events, False))
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
        self._push(_row_event("insert", codec.source, new, None, toast, lsn, self._seq, txn))

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
        self._push(_row_event("update", codec.source, new, old, toast, lsn, self._seq, txn))

    def _on_delete(self, msg: Delete, lsn: int) -> None:
        txn = self._txn
        if txn is None:
            raise self._no_txn(lsn)
        codec = self._codec(msg.relation_oid, lsn)
        old = codec.load(msg.old)[0] if msg.old_kind == "O" else codec.load_key(msg.old)
        self._push(_row_event("delete", codec.source, None, old, _NO_TOAST, lsn, self._seq, txn))

    def _on_truncate(self, msg: Truncate, lsn: int) -> None:
        txn = self._txn
        if txn is None:
            raise self._no_txn(lsn)
        sources = [self._codec(oid, lsn).source for oid in msg.relation_oids]
        names = tuple(s.name for s in sources)
        cascade = bool(msg.options & 1)
        restart = bool(msg.options & 2)
        for source in sources:
            self._push(
                _new_event(
                    Event,
                    (
                        "truncate",
                        source,
                        None,
                        None,
                        _NO_TOAST,
                        _new_lsn(LSN, lsn),
                        self._seq,
                        txn,
                        None,
                        None,
                        None,
                        names,
                        cascade,
                        restart,
                    ),
                )
            )

    def _on_message(self, msg: LogicalMessage, lsn: int) -> None:
        txn = self._txn
        if msg.transactional and txn is not None:
            self._push(_message_event(msg, self._seq, txn))
            return
        if msg.prefix == HEARTBEAT_PREFIX and not msg.transactional:
            self.heartbeats_received += 1
            self.last_heartbeat = time.monotonic()
            self.last_heartbeat_lsn = msg.lsn
            self._ready.append(_Mark(msg.lsn))
            return
        # Outside a transaction: a batch of its own, confirmed once handled.
        own = Transaction(0, msg.lsn, _timestamp(self._clock))
        event = _message_event(msg, 0, own)
        self._ready.append(Batch(own, [event], True, msg.lsn))

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
            self._ready.append(Batch(txn, self._events, True, end_lsn))
        else:
            self._ready.append(_Mark(end_lsn))
        self._events = []
        self._txn = None
        self._batch_bytes = 0

    def _on_other(self, msg: Message, lsn: int) -> None:
        t = type(msg)
        if t is Begin:
            m: Any = msg
            self._begin(Transaction(m.xid, m.final_lsn, _timestamp(m.commit_ts)))
        elif t is Commit:
            self._end(msg.end_lsn)  # type: ignore[union-attr]
        elif t is Origin:
            if self._txn is not None and not self._seq:
                txn = self._txn
                self._txn = Transaction(
                    txn.xid,
                    txn.commit_lsn,
                    txn.commit_timestamp,
                    msg.name,  # type: ignore[union-attr]
                    txn.gid,
                )
        elif t is Type:
            pass  # types are looked up in the catalog when a relation uses them
        elif t is StreamStart:
            m = msg
            spool = self._spools.get(m.xid)
            if spool is None:
                spool = self._spools[m.xid] = _Spool(self._spool_dir, in_stream=True)
            self._stream_spool = spool
        elif t is StreamStop:
            self._stream_spool = None
        elif t is StreamCommit:
            m = msg
            spool = self._spools.pop(m.xid, None)
            if spool is None:
                raise DecodeError(f"stream commit of unknown transaction {m.xid}", LSN(lsn))
            self._begin(Transaction(m.xid, m.commit_lsn, _timestamp(m.commit_ts)))
            self._replay = _Replay(spool, m.end_lsn)
        elif t is StreamAbort:
            m = msg
            if m.subxid == m.xid or m.subxid == 0:
                spool = self._spools.pop(m.xid, None)
                if spool is not None:
                    spool.close()
            elif m.xid in self._spools:
                self._spools[m.xid].aborted.add(m.subxid)
        elif t is BeginPrepare:
            m = msg
            spool = _Spool(self._spool_dir, in_stream=False)
            spool.prepare_lsn = m.prepare_lsn
            self._prepare_spool = spool
        elif t is StreamPrepare:
            m = msg
            spool = self._spools.pop(m.xid, None)
            if spool is None:
                raise DecodeError(f"stream prepare of unknown transaction {m.xid}", LSN(lsn))
            spool.prepare_lsn = m.prepare_lsn
            spool.relations_applied = True
            self._prepared[m.gid] = spool
            # The server counts the table descriptions inside a prepared
            # stream as delivered: later transactions rely on them.
            self._relations_todo = spool
        elif t is CommitPrepared:
            m = msg
            spool = self._prepared.pop(m.gid, None)
            txn = Transaction(m.xid, m.commit_lsn, _timestamp(m.commit_ts), None, m.gid)
            if spool is None:
                logger.warning(
                    "COMMIT PREPARED of %r whose PREPARE was not seen; it was delivered before",
                    m.gid,
                )
                self._ready.append(_Mark(m.end_lsn))
            else:
                self._begin(txn)
                self._replay = _Replay(spool, m.end_lsn)
        elif t is RollbackPrepared:
            m = msg
            spool = self._prepared.pop(m.gid, None)
            if spool is not None:
                spool.close()
            self._ready.append(_Mark(m.rollback_end_lsn))
        elif t is Prepare:
            raise DecodeError("PREPARE without BEGIN PREPARE", LSN(lsn))
        else:  # pragma: no cover - decode() returns only the types above
            raise DecodeError(f"unexpected message {msg!r}", LSN(lsn))

    def _on_prepare(self, msg: Prepare) -> None:
        spool = self._prepare_spool
        assert spool is not None
        self._prepare_spool = None
        self._prepared[msg.gid] = spool

    async def _apply_spooled_relations(self) -> None:
        spool = self._relations_todo
        assert spool is not None
        # Applying a description twice is harmless: if this is interrupted,
        # it starts over.
        for lsn, payload in spool.records():
            if payload[0] == _RELATION_TAG:
                msg = self._decode(payload, lsn, spool.in_stream)
                assert isinstance(msg, Relation)
                if msg.xid not in spool.aborted:
                    await self._on_relation(msg)
        self._relations_todo = None

    async def _replay_some(self) -> None:
        replay = self._replay
        assert replay is not None
        spool = replay.spool
        in_stream = spool.in_stream
        ready = self._ready
        for lsn, payload in replay:
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
                    try:
                        await self._on_relation(msg)  # type: ignore[arg-type]
                    except BaseException:
                        replay.pushed_back.append((lsn, payload))
                        raise
            elif t in (Type, Origin):
                pass
            else:
                raise DecodeError(f"unexpected {type(msg).__name__} in a spooled transaction")
            if ready:
                return
        self._replay = None
        spool.close()
        self._end(replay.end_lsn)

    async def _on_relation(self, msg: Relation) -> None:
        oids = [c.type_oid for c in msg.columns]
        for attempt in (1, 2):
            catalog = await self._catalog_for_lookup()
            try:
                if self._resolver.unknown(oids):
                    await self._resolver.resolve(catalog, oids)
                names = await self._type_names_for(catalog, msg)
                pkey = await self._primary_key(catalog, msg.oid)
                break
            except psycopg.OperationalError as exc:
                # The SQL connection went away while idle (a timeout, a
                # proxy, pg_terminate_backend): open a new one, once.
                await self._drop_catalog()
                if attempt == 2:
                    raise StreamError(
                        f"could not read the catalog for {msg.namespace}.{msg.name}: {exc}"
                    ) from exc
            except psycopg.Error as exc:
                raise StreamError(
                    f"could not read the catalog for {msg.namespace}.{msg.name}: {exc}"
                ) from exc
        if self._binary_active:
            self._require_binary_loaders(oids)
        database = self._facts.database if self._facts is not None else ""
        source = make_source(msg, database, names, pkey)
        codec = RelationCodec(msg, source, self._adapters)
        self._relations[msg.oid] = codec
        self._fast[msg.oid] = codec.fast_path()

    async def _catalog_for_lookup(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await self._open_catalog()
        except ConnectionFailed:
            raise
        except psycopg.OperationalError as exc:
            raise connection_error(exc) from exc

    async def _type_names_for(
        self, catalog: psycopg.AsyncConnection[Any], msg: Relation
    ) -> dict[int, str]:
        keys = [(c.type_oid, c.type_modifier) for c in msg.columns]
        todo = [k for k in keys if k not in self._type_names]
        if todo:
            cur = await catalog.execute(
                "SELECT t, m, format_type(t, NULLIF(m, -1)) "
                "FROM unnest(%s::oid[], %s::int4[]) AS u(t, m)",
                ([k[0] for k in todo], [k[1] for k in todo]),
            )
            for t, m, name in await cur.fetchall():
                self._type_names[(int(t), m)] = name
        return {i: self._type_names.get(k, "unknown") for i, k in enumerate(keys)}

    async def _primary_key(
        self, catalog: psycopg.AsyncConnection[Any], oid: int
    ) -> tuple[str, ...]:
        cur = await catalog.execute(
            """
            SELECT a.attname::text
              FROM pg_index i
              JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = %s AND i.indisprimary
             ORDER BY k.n
            """,
            (oid,),
        )
        return tuple(r[0] for r in await cur.fetchall())


def connect(
    dsn: str,
    *,
    publication: str | Sequence[str],
    slot: str | None = None,
    durable: bool = False,
    **options: Any,
) -> Stream:
    """Stream the changes of *publication* from the database at *dsn*.

    Args:
        dsn: a libpq connection string or URL (``postgresql://user@host/db``).
        publication: the publication to read, or a list of them.
        slot: the replication slot's name. A durable slot needs one; a
            temporary slot gets a random name.
        durable: keep the slot on the server between runs, so that a restart
            resumes after the last handled transaction. ``False`` (default)
            makes a temporary slot that vanishes with the connection: changes
            made while nothing listens are lost.
        **options: ``create_slot``, ``start_lsn``, ``binary``, ``streaming``,
            ``two_phase``, ``origin``, ``messages``, ``max_batch_events``,
            ``max_batch_bytes``,
            ``status_interval``, ``allow_gap``, ``wait_for_slot``,
            ``standby_retry``, ``reconnect``, ``max_reconnect_delay``,
            ``connect_timeout``, ``spool_dir``, ``heartbeat_interval``: see
            :class:`Stream` and docs/engine.md.

    Returns:
        A :class:`Stream`; use it with ``async with``.

    Example::

        async with walex.connect(dsn, publication="events", slot="orders",
                                 durable=True) as stream:
            async for batch in stream:
                for event in batch.events:
                    print(event.type, event.table, event.new_record)
    """
    return Stream(dsn, publication=publication, slot=slot, durable=durable, **options)

"""The engine's orchestration: :func:`connect` and :class:`Stream`.

A :class:`Stream` reads one replication slot and yields :class:`~walex.Batch`
objects: the changes of one transaction (or a bounded part of a large one), in
commit order. It is pull-driven: nothing is read from the server while the
caller handles a batch, so memory stays bounded whatever the backlog.

This module only wires the steps together and keeps them running: it checks
the server and opens the slot (:mod:`walex.admin`, :mod:`walex.replication`),
moves frames from the connection into the :class:`~walex.transactions.Assembler`,
asks the :class:`~walex.catalog.Catalog` about new tables, hands batches out
through the :class:`~walex.checkpoint.Checkpoint`, and runs the status and
heartbeat tasks and the reconnects. It decodes nothing and decides nothing
about what may be confirmed.

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
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import psycopg

from .admin import ServerFacts, preflight, slot_info
from .catalog import BinaryUnsupported, Catalog
from .checkpoint import Checkpoint
from .errors import (
    ConnectionFailed,
    ServerError,
    SlotInUse,
    SlotLost,
    StreamError,
    WalexError,
    is_transient,
    translate,
)
from .events import Batch, Transaction
from .lsn import LSN
from .options import StreamOptions, Target
from .pgoutput.messages import Relation
from .replication import slot as slots
from .replication.commands import protocol_version, start_replication
from .replication.connection import ReplicationConnection, replication_conninfo
from .transactions import HEARTBEAT_PREFIX, Assembler

__all__ = ["HEARTBEAT_PREFIX", "Stream", "connect"]

logger = logging.getLogger(__name__)


class Stream:
    """A stream of changes from one replication slot. Make it with :func:`connect`.

    Iterate it with ``async for batch in stream``. The previous batch counts
    as handled when the next one is asked for, or when the ``async with``
    block ends without an exception.

    Args:
        target: what to read (database, publications, slot).
        options: how to read it.

    Attributes:
        options: the stream's options.
        slot: the replication slot's name.
        publications: the publications read.
        durable: whether the slot outlives the connection.
        protocol_version: the pgoutput protocol version in use (0 before opening).
        reconnects: connections re-established after a loss.
        status_updates: standby status updates sent.
        heartbeats_sent: heartbeats written (``heartbeat_interval``).
        waiting_for_slot: true while a durable slot is held by another
            process and this stream waits as a standby.
    """

    def __init__(self, target: Target, options: StreamOptions) -> None:
        self._dsn = target.dsn
        self.options = options
        self.slot = target.slot
        self.publications = list(target.publications)
        self.durable = target.durable
        self._start_lsn = LSN(options.start_lsn or 0)
        self.protocol_version = 0
        self.reconnects = 0
        self.status_updates = 0
        self.heartbeats_sent = 0
        self.waiting_for_slot = False

        spool_dir = os.fspath(options.spool_dir) if options.spool_dir is not None else None
        self._assembler = Assembler(
            max_batch_events=options.max_batch_events,
            max_batch_bytes=options.max_batch_bytes,
            spool_dir=spool_dir,
        )
        self._dirty = asyncio.Event()
        self._checkpoint = Checkpoint(self._assembler.holds, lambda _: self._dirty.set())
        self._catalog = Catalog(target.dsn, options.connect_timeout)
        self._catalog.binary = options.binary
        self._conn: ReplicationConnection | None = None
        self._facts: ServerFacts | None = None
        self._inflight: Batch | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._opened = False
        self._closed = False
        self._backend_pid: int | None = None
        self._gc_paused = False
        self._failures = 0  # connection losses since the last delivered batch
        self._handled_txn: Transaction | None = None  # of the newest handled batch
        self._silence: _Silence | None = None  # while waiting for the server

    # -- public state ----------------------------------------------------

    @property
    def confirmed_lsn(self) -> LSN:
        """The position reported to the server as flushed (handled)."""
        return self._checkpoint.confirmed

    @property
    def received_lsn(self) -> LSN:
        """The newest WAL position received from the server."""
        return LSN(self._assembler.received)

    @property
    def server_wal_end(self) -> LSN:
        """The server's WAL end, as of its last message."""
        return LSN(self._assembler.server_wal_end)

    @property
    def connected(self) -> bool:
        """Whether the replication connection is up."""
        return self._conn is not None and not self._conn.closed

    @property
    def handled_commit_timestamp(self) -> datetime | None:
        """The commit time of the newest transaction handed out and handled."""
        txn = self._handled_txn
        return txn.commit_timestamp if txn is not None else None

    @property
    def silent_for(self) -> float:
        """Seconds the server has sent nothing while the stream waits for it (else 0)."""
        silence = self._silence
        return silence.quiet() if silence is not None else 0.0

    @property
    def heartbeats_received(self) -> int:
        """Heartbeats read back from the stream."""
        return self._assembler.heartbeats_received

    @property
    def last_heartbeat(self) -> float | None:
        """``time.monotonic()`` when the last heartbeat was read back."""
        return self._assembler.last_heartbeat

    @property
    def last_heartbeat_lsn(self) -> LSN | None:
        """The WAL position of the last heartbeat read back."""
        return self._assembler.last_heartbeat_lsn

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
            await self._catalog.connection()
            await self._start_replication(first=True)
        except BaseException:
            await self._close_connections()
            raise
        loop = asyncio.get_running_loop()
        self._status_task = loop.create_task(self._status_loop())
        interval = self.options.heartbeat_interval
        if interval is not None:
            self._heartbeat_task = loop.create_task(self._heartbeat_loop(interval))

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
                confirmed = self._checkpoint.confirmed
                conn.send_status(self._assembler.received, confirmed, confirmed)
                async with asyncio.timeout(5):
                    await conn.finish_sending()
        await self._close_connections()
        self._assembler.close()

    async def _close_connections(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        await self._catalog.drop_connection()

    # -- connecting ----------------------------------------------------------

    async def _start_replication(self, first: bool) -> None:
        catalog = await self._catalog.connection()
        o = self.options
        self._facts = facts = await preflight(
            catalog,
            publications=self.publications,
            slot=self.slot,
            durable=self.durable,
            create_slot=o.create_slot,
            binary=o.binary,
            streaming=o.streaming,
            two_phase=o.two_phase,
            origin=o.origin,
        )
        self._catalog.database = facts.database
        self.protocol_version = protocol_version(facts.version_num)
        await self._catalog.prefetch(self.publications)
        if self._catalog.binary:
            await self._catalog.check_binary(self.publications)
        slot = facts.slot
        if slot is not None and slot.active_pid is not None:
            pid = slot.active_pid
            if pid == self._backend_pid:
                await slots.wait_for_lost_walsender(self._catalog.connection, self.slot, pid)
            else:
                await self._wait_for_slot(pid)
            # Let go of: a temporary slot went with its process; a durable one stays.
            slot = await slot_info(await self._catalog.connection(), self.slot)
        conn = await ReplicationConnection.connect(
            replication_conninfo(self._dsn), o.connect_timeout
        )
        self._conn = conn
        self._backend_pid = conn.pgconn.backend_pid
        try:
            if slot is None:
                self._check_no_gap(first)
                await slots.create(conn, self.slot, durable=self.durable, two_phase=o.two_phase)
            await conn.start(self._start_command(conn))
        except ServerError as exc:
            conn.close()
            self._conn = None
            raise translate(exc, slot=self.slot) from exc
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

    def _check_no_gap(self, first: bool) -> None:
        """A temporary slot that is gone after a reconnect means a gap: refuse or say so."""
        if self.durable or first:
            return
        if not self.options.allow_gap:
            raise SlotLost(
                f"the temporary slot {self.slot!r} went away with its connection; "
                "changes committed since then are not delivered. Use a durable slot "
                "(durable=True) to resume without a gap, or pass allow_gap=True to "
                "go on from now"
            )
        logger.warning(
            "temporary slot %r was lost; going on from now (allow_gap=True): "
            "changes committed while disconnected are not delivered",
            self.slot,
        )

    def _start_command(self, conn: ReplicationConnection) -> str:
        o = self.options
        return start_replication(
            conn,
            self.slot,
            LSN(max(self._start_lsn, self._checkpoint.confirmed)),
            proto_version=self.protocol_version,
            publications=self.publications,
            messages=o.messages,
            binary=self._catalog.binary,
            streaming=o.streaming,
            two_phase=o.two_phase,
            origin=o.origin,
        )

    async def _wait_for_slot(self, pid: int) -> None:
        if not (self.durable and self.options.wait_for_slot):
            raise SlotInUse(
                f"slot {self.slot!r} is in use by server process {pid}; stop the other "
                "consumer, or use another slot name",
                pid,
            )
        self.waiting_for_slot = True
        try:
            await slots.wait_for_release(
                self._catalog.connection, self.slot, pid, self.options.standby_retry
            )
        finally:
            self.waiting_for_slot = False

    async def _reconnect(self, cause: BaseException) -> None:
        self._resume_gc()  # reconnecting can take long: let the collector run
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if not self.options.reconnect:
            raise StreamError(f"the replication connection broke: {cause}") from cause
        logger.warning("replication connection lost (%s); reconnecting", cause)
        # Whatever was received but not handled will be sent again.
        self._assembler.reset()
        self._checkpoint.reset()
        self._failures += 1
        delay = 0.5
        max_delay = self.options.max_reconnect_delay
        if self._failures > 1:
            # The stream broke again before anything was delivered: back off.
            pause = min(0.5 * 2 ** (self._failures - 2), max_delay)
            logger.warning("the stream keeps failing; waiting %.1fs before reconnecting", pause)
            await asyncio.sleep(pause)
        await self._catalog.drop_connection()  # it most likely broke too
        while True:
            try:
                await self._start_replication(first=False)
                self.reconnects += 1
                logger.info("reconnected to slot %r", self.slot)
                return
            except (ConnectionFailed, StreamError, OSError, psycopg.OperationalError) as exc:
                if isinstance(exc, ServerError) and not is_transient(exc.sqlstate):
                    raise
                await self._catalog.drop_connection()
                logger.warning("reconnect failed (%s); retrying in %.1fs", exc, delay)
            except SlotInUse as exc:
                logger.warning("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    # -- status updates ------------------------------------------------------

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.status_interval):
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
                catalog = await self._catalog.connection()
                await catalog.execute(
                    "SELECT pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,)
                )
                self.heartbeats_sent += 1
            except (WalexError, psycopg.Error) as exc:
                logger.warning("heartbeat not sent: %s", exc)
                await self._catalog.drop_connection()

    def _send_status(self, reply: bool = False) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        confirmed = self._checkpoint.confirmed
        try:
            conn.send_status(self._assembler.received, confirmed, confirmed, reply)
            self.status_updates += 1
        except WalexError as exc:
            logger.debug("status update not sent: %s", exc)

    def _mark_handled(self) -> None:
        batch = self._inflight
        if batch is not None:
            self._inflight = None
            self.ack(batch)

    def ack(self, batch: Batch) -> None:
        """Note that *batch*, from :meth:`read`, is handled: every change of it.

        Batches may be acknowledged in any order; the position confirmed to
        the server moves over the ones that are handled together with every
        batch before them. A batch read before a lost connection may still
        be acknowledged: the server sends it again, and its copy counts.

        Raises:
            ValueError: *batch* was acknowledged before, or not read from this stream.
        """
        txn = batch.transaction
        newest = self._handled_txn
        if newest is None or txn.commit_lsn >= newest.commit_lsn:
            self._handled_txn = txn
        self._checkpoint.done(batch)

    @property
    def in_flight(self) -> int:
        """Batches read and not acknowledged yet."""
        return self._checkpoint.in_flight

    # -- reading -------------------------------------------------------------

    async def read(self) -> Batch:
        """The next batch, which stays unconfirmed until :meth:`ack` is called for it.

        For consumers that keep several batches in flight (destinations
        that pipeline): read ahead, acknowledge each batch when it is
        handled, in any order. ``async for batch in stream`` is the simple
        form: each batch counts as handled when the next one is asked for.
        Use one form or the other on a stream, not both.

        Raises:
            StopAsyncIteration: the stream is closed.
        """
        if not self._opened:
            await self.open()
        if self._closed:
            raise StopAsyncIteration
        ready = self._assembler.ready
        checkpoint = self._checkpoint
        while True:
            while ready:
                item = ready.popleft()
                if type(item) is Batch:
                    checkpoint.issue(item)
                    self._failures = 0
                    return item
                checkpoint.mark(item)  # type: ignore[arg-type]
            await self._fill()

    # -- the iterator --------------------------------------------------------

    async def __anext__(self) -> Batch:
        self._mark_handled()
        batch = await self.read()
        self._inflight = batch
        return batch

    async def _fill(self) -> None:
        """Read, decode and describe until at least one batch or position is ready."""
        # Decoding allocates many objects that reference counting frees; the
        # cyclic collector only slows it down (by a third, measured). Pause
        # it while filling one batch, but not while waiting for the server,
        # when the rest of the program runs.
        self._pause_gc()
        assembler = self._assembler
        try:
            while not assembler.ready:
                try:
                    need = assembler.step()
                    if assembler.reply_requested:
                        assembler.reply_requested = False
                        self._send_status()
                    if need is not None:
                        await self._describe(need)
                    elif not assembler.ready:
                        await self._receive()
                except BinaryUnsupported as exc:
                    await self._reconnect(exc)
        finally:
            self._resume_gc()

    async def _describe(self, msg: Relation) -> None:
        self._assembler.add_relation(await self._catalog.describe(msg))

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
        frames = self._assembler.frames
        try:
            if conn is None:
                raise StreamError("not connected")
            silence = self._silence = _Silence(self.options.receive_timeout)
            try:
                while True:
                    if not conn.read(frames):
                        raise StreamError("the server ended the replication stream")
                    if frames:
                        return
                    wait, ask = silence.next_wait()
                    if ask:
                        # Quiet for half the timeout: a live server answers this at once.
                        self._send_status(reply=True)
                    self._resume_gc()
                    try:
                        await conn.wait_readable(wait)
                    finally:
                        self._pause_gc()
            finally:
                self._silence = None
        except (StreamError, OSError) as exc:
            if isinstance(exc, ServerError):
                if "binary output function" in str(exc) and self._catalog.binary:
                    logger.warning("%s; streaming in text instead", exc)
                    self._catalog.binary = False
                elif not is_transient(exc.sqlstate):
                    translated = translate(exc, slot=self.slot)
                    if translated is exc:
                        raise StreamError(f"the server stopped the stream: {exc}") from exc
                    raise translated from exc
            await self._reconnect(exc)


class _Silence:
    """How long to wait for the server before asking it for a keepalive, and
    before counting the connection as dead (like ``wal_receiver_timeout``)."""

    __slots__ = ("_asked", "_start", "_timeout")

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._start = time.monotonic()
        self._asked = False

    def quiet(self) -> float:
        """Seconds since the wait began."""
        return time.monotonic() - self._start

    def next_wait(self) -> tuple[float | None, bool]:
        """Seconds to wait next (``None``: for ever), and whether to ask for a keepalive first.

        Raises:
            StreamError: the server has been silent for the whole timeout.
        """
        timeout = self._timeout
        if timeout is None:
            return None, False
        quiet = time.monotonic() - self._start
        if quiet >= timeout:
            raise StreamError(
                f"nothing from the server for {timeout:g} s, not even a keepalive: the "
                "connection counts as dead (receive_timeout)"
            )
        if quiet >= timeout / 2:
            ask, self._asked = not self._asked, True
            return timeout - quiet, ask
        return timeout / 2 - quiet, False


def connect(
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
    receive_timeout: float | None = 60.0,
    allow_gap: bool = False,
    wait_for_slot: bool = True,
    standby_retry: float = 5.0,
    reconnect: bool = True,
    max_reconnect_delay: float = 30.0,
    connect_timeout: float = 30.0,
    spool_dir: str | os.PathLike[str] | None = None,
    heartbeat_interval: float | None = None,
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
        create_slot, start_lsn, binary, streaming, two_phase, origin,
            messages, max_batch_events, max_batch_bytes, status_interval,
            receive_timeout, allow_gap, wait_for_slot, standby_retry, reconnect,
            max_reconnect_delay, connect_timeout, spool_dir,
            heartbeat_interval: the engine's options
            (:class:`walex.options.StreamOptions`, docs/engine.md).

    Returns:
        A :class:`Stream`; use it with ``async with``.

    Raises:
        ConfigurationError: an argument is wrong (nothing connects).

    Example::

        async with walex.connect(dsn, publication="events", slot="orders",
                                 durable=True) as stream:
            async for batch in stream:
                for event in batch.events:
                    print(event.type, event.table, event.new_record)
    """
    target = Target.check(dsn, publication, slot, durable)
    options = StreamOptions(
        create_slot=create_slot,
        start_lsn=start_lsn,
        binary=binary,
        streaming=streaming,
        two_phase=two_phase,
        origin=origin,
        messages=messages,
        max_batch_events=max_batch_events,
        max_batch_bytes=max_batch_bytes,
        status_interval=status_interval,
        receive_timeout=receive_timeout,
        allow_gap=allow_gap,
        wait_for_slot=wait_for_slot,
        standby_retry=standby_retry,
        reconnect=reconnect,
        max_reconnect_delay=max_reconnect_delay,
        connect_timeout=connect_timeout,
        spool_dir=spool_dir,
        heartbeat_interval=heartbeat_interval,
    )
    return Stream(target, options)

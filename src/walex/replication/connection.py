"""The replication connection: libpq in ``replication=database`` mode, on asyncio.

It sends replication commands, enters the copy stream and moves whole frames
out of libpq; it knows nothing of what the frames hold (see
:mod:`walex.replication.framing`) or of pgoutput. It waits on libpq's socket
with ``loop.add_reader`` and never blocks the event loop. libpq (through
psycopg's ``PGconn``) does authentication, TLS, service files and
``target_session_attrs``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq.abc import PGconn, PGresult

from ..admin import KEEPALIVES
from ..errors import ConnectionFailed, ServerError, StreamError, connection_failure
from .framing import status_update

__all__ = ["ReplicationConnection", "replication_conninfo", "with_keepalives"]

logger = logging.getLogger(__name__)

# Settings for the walsender session: they decide the text that pgoutput
# sends, and psycopg's loaders expect these styles.
_SESSION_OPTIONS = (
    "-c datestyle=ISO,YMD -c intervalstyle=postgres -c timezone=UTC "
    "-c extra_float_digits=3 -c bytea_output=hex"
)


def with_keepalives(params: dict[str, Any]) -> dict[str, Any]:
    """*params* (a conninfo as a dict) with TCP keepalives, where it sets none."""
    for key, value in KEEPALIVES.items():
        params.setdefault(key, value)
    return params


def replication_conninfo(dsn: str, **extra: Any) -> str:
    """The conninfo of a logical replication connection for *dsn*."""
    params = with_keepalives(conninfo_to_dict(dsn))
    options = params.get("options")
    params["options"] = f"{options} {_SESSION_OPTIONS}" if options else _SESSION_OPTIONS
    params.setdefault("application_name", "walex")
    params["replication"] = "database"
    params["client_encoding"] = "UTF8"
    params.update(extra)
    return make_conninfo("", **params)


def _result_error(res: PGresult) -> ServerError:
    msg = res.error_message.decode(errors="replace").strip()
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    return ServerError(msg, state.decode() if state else None)


class ReplicationConnection:
    """One replication connection.

    Use :meth:`connect`; then :meth:`command` for replication commands, then
    :meth:`start` to enter the copy stream, :meth:`read` to take frames and
    :meth:`send_status` to report positions.
    """

    def __init__(self, pgconn: PGconn) -> None:
        self.pgconn = pgconn
        self._loop = asyncio.get_running_loop()
        self._fd = pgconn.socket
        self._closed = False
        self._unsent = False

    @classmethod
    async def connect(cls, conninfo: str, connect_timeout: float = 30.0) -> ReplicationConnection:
        """Open a replication connection without blocking the loop.

        Raises:
            AuthenticationFailed: the server refused the credentials.
            ConnectionFailed: the server cannot be reached or refused us.
        """
        pgconn = pq.PGconn.connect_start(conninfo.encode())
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                while True:
                    status = pgconn.connect_poll()
                    if status == pq.PollingStatus.OK:
                        break
                    if status == pq.PollingStatus.FAILED:
                        raise _connect_error(pgconn, conninfo)
                    await _wait_fd(loop, pgconn.socket, write=status == pq.PollingStatus.WRITING)
        except TimeoutError:
            pgconn.finish()
            raise ConnectionFailed(
                f"could not connect within {connect_timeout:g} s; check the host and port, "
                "and that the server is running"
            ) from None
        except BaseException:
            pgconn.finish()
            raise
        pgconn.nonblocking = 1
        return cls(pgconn)

    def quote_ident(self, name: str) -> str:
        """*name* as a quoted SQL identifier, escaped by libpq."""
        return pq.Escaping(self.pgconn).escape_identifier(name.encode()).decode()

    def quote_literal(self, text: str) -> str:
        """*text* as a quoted SQL string literal, escaped by libpq."""
        return pq.Escaping(self.pgconn).escape_literal(text.encode()).decode()

    @property
    def server_version(self) -> int:
        """The server's version as a number, 150004 for 15.4."""
        return self.pgconn.server_version

    @property
    def closed(self) -> bool:
        return self._closed or self.pgconn.status != pq.ConnStatus.OK

    async def _flush(self) -> None:
        while True:
            try:
                rc = self.pgconn.flush()
            except psycopg.OperationalError as exc:
                raise StreamError(f"could not send to the server: {exc}") from exc
            if rc == 0:
                return
            await _wait_fd(self._loop, self._fd, write=True)

    async def _send(self, query: str) -> None:
        try:
            self.pgconn.send_query(query.encode())
        except psycopg.OperationalError as exc:
            raise StreamError(f"could not send {query.split()[0]}: {exc}") from exc
        await self._flush()

    async def _result(self) -> PGresult | None:
        """The next result of the running command, waiting without blocking."""
        try:
            while self.pgconn.is_busy():
                await _wait_fd(self._loop, self._fd)
                self.pgconn.consume_input()
        except psycopg.OperationalError as exc:
            raise StreamError(f"lost the connection to the server: {exc}") from exc
        return self.pgconn.get_result()

    async def command(self, query: str) -> list[tuple[str | None, ...]]:
        """Run one replication command (simple query protocol); return its rows.

        Raises:
            ServerError: the server answered with an error.
        """
        await self._send(query)
        rows: list[tuple[str | None, ...]] = []
        error: ServerError | None = None
        while (res := await self._result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                error = _result_error(res)
            elif res.status == pq.ExecStatus.TUPLES_OK:
                for r in range(res.ntuples):
                    values = (res.get_value(r, c) for c in range(res.nfields))
                    rows.append(tuple(v.decode() if v is not None else None for v in values))
        if error is not None:
            raise error
        if self.pgconn.status != pq.ConnStatus.OK:
            raise StreamError(self._error("the connection broke"))
        return rows

    async def start(self, query: str) -> None:
        """Send START_REPLICATION and wait for the copy stream to open."""
        await self._send(query)
        while True:
            res = await self._result()
            if res is None:
                raise StreamError(self._error("START_REPLICATION returned no result"))
            if res.status == pq.ExecStatus.COPY_BOTH:
                return
            if res.status == pq.ExecStatus.FATAL_ERROR:
                err = _result_error(res)
                while self.pgconn.get_result() is not None:
                    pass
                raise err

    def read(self, out: deque[bytes]) -> bool:
        """Move every complete frame libpq holds into *out*, without waiting.

        Returns:
            False when the server ended the copy stream.

        Raises:
            StreamError: the connection broke.
        """
        pgconn = self.pgconn
        get = pgconn.get_copy_data
        append = out.append
        try:
            pgconn.consume_input()
            while True:
                n, data = get(1)
                if n > 0:
                    append(bytes(data))
                elif n == 0:
                    return True
                else:
                    break
        except psycopg.OperationalError as exc:
            raise StreamError(f"lost the connection to the server: {exc}") from exc
        res = pgconn.get_result()
        if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
            raise _result_error(res)
        return False

    async def wait_readable(self, limit: float | None) -> bool:
        """Wait until the socket has data; False on timeout."""
        try:
            async with asyncio.timeout(limit):
                await _wait_fd(self._loop, self._fd)
        except TimeoutError:
            return False
        return True

    def send_status(self, write: int, flush: int, apply: int, reply: bool = False) -> None:
        """Queue a standby status update and start sending it."""
        msg = status_update(write, flush, apply, reply)
        try:
            self.pgconn.put_copy_data(msg)
            rc = self.pgconn.flush()
        except psycopg.OperationalError as exc:
            raise StreamError(f"could not send a status update: {exc}") from exc
        if rc == 1 and not self._unsent:
            # The socket is full: finish in the background.
            self._unsent = True
            task = self._loop.create_task(self._finish_flush())
            task.add_done_callback(_log_task_error)

    async def _finish_flush(self) -> None:
        try:
            await self._flush()
        finally:
            self._unsent = False

    async def finish_sending(self) -> None:
        """Wait until everything queued has gone out."""
        await self._flush()

    def _error(self, what: str) -> str:
        detail = self.pgconn.get_error_message().strip() if self.pgconn else ""
        return f"{what}: {detail}" if detail else what

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            self.pgconn.finish()


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("background send failed: %s", task.exception())


def _connect_error(pgconn: PGconn, conninfo: str) -> ConnectionFailed:
    return connection_failure(pgconn.get_error_message(), conninfo)


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, write: bool = False) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            loop.remove_writer(fd)
    else:
        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

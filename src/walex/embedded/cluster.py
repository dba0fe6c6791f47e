"""One throw-away Postgres cluster: create it, run it, remove it.

This module owns :class:`EmbeddedPostgres` (``initdb``, ``pg_ctl``, start,
stop, restart, kill, cleanup, databases and connection strings), the
settings every cluster gets, and :func:`database_or_embedded`. It must not
look for binaries itself (:mod:`.binaries` does) nor handle processes and
signals directly (:mod:`.process` does).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from ..errors import ConfigurationError, EmbeddedPostgresError, PostgresNotFound
from .binaries import PostgresBinaries, _run, _run_as, _RunAs, find_binaries
from .process import (
    _alive,
    _dismiss,
    _kill_server,
    _read_pid,
    _read_status,
    _start_watchdog,
    _stop_at_exit,
)

__all__ = ["DEFAULT_SETTINGS", "EmbeddedPostgres", "database_or_embedded"]

DEFAULT_SETTINGS: Mapping[str, str] = MappingProxyType(
    {
        "wal_level": "logical",
        "max_replication_slots": "64",
        "max_wal_senders": "64",
        "max_connections": "200",
        "max_prepared_transactions": "20",
        # Small, so that tests can make the server stream a transaction
        # (pgoutput protocol 2+) with a few hundred rows.
        "logical_decoding_work_mem": "64kB",
        # A throw-away cluster needs no durability against an OS crash, and
        # these make it fast.
        "fsync": "off",
        "full_page_writes": "off",
        # Not off: a walsender sends only WAL that is flushed, so an
        # asynchronous commit reaches a stream up to 3 x wal_writer_delay
        # later (170 ms measured), and kill() would lose commits still in
        # WAL buffers. With fsync off a synchronous commit costs nothing.
        "synchronous_commit": "on",
        "shared_buffers": "64MB",
        "wal_sender_timeout": "60s",
        "listen_addresses": "127.0.0.1",
    }
)
"""The settings of every embedded cluster; ``settings=`` overrides them."""

_NOT_FOUND = (
    "no usable Postgres binaries (initdb, pg_ctl, postgres) were found: "
    'install Postgres, or run `pip install "walex[embedded]"` for a bundled one'
)
_USER = "postgres"
_HOST = "127.0.0.1"
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_STOP_MODES = ("smart", "fast", "immediate")
_LOG_TAIL_LINES = 30
# Longer than the default wal_sender_timeout, which bounds how long a
# logical replication client can hold up a fast shutdown.
_STOP_TIMEOUT = 90


def _chown(path: Path, run_as: _RunAs | None) -> None:
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(part.strip() for part in (result.stdout, result.stderr) if part.strip())


def _free_port() -> int:
    # Another process may take the port before Postgres binds it; starting
    # then fails with a clear message in the log, which is rare enough.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote_setting(name: str, value: str) -> str:
    if not _SETTING_NAME.fullmatch(name):
        raise ConfigurationError(f"not a Postgres setting name: {name!r}")
    if any(char in value for char in "\n\r\0"):
        raise ConfigurationError(f"the value of Postgres setting {name} has a line break")
    escaped = value.replace("\\", "\\\\").replace("'", "''")
    return f"{name} = '{escaped}'"


class EmbeddedPostgres:
    """A local Postgres cluster that belongs to this process.

    The cluster listens on 127.0.0.1 only, on its own socket directory, and
    trusts every local connection as the superuser ``postgres``.

    Args:
        binaries: the installation to run; the newest that
            :func:`find_binaries` finds when None.
        port: the TCP port; a free one when None.
        settings: Postgres settings that override :data:`DEFAULT_SETTINGS`.
        base_dir: where the data and socket directories go; a new temporary
            directory, removed by :meth:`cleanup`, when None.

    Raises:
        PostgresNotFound: ``binaries`` is None and no Postgres is installed.
        ConfigurationError: a setting is malformed, or sets ``port``.

    Attributes:
        binaries: the installation that runs the cluster.
        major: its major version.
        port: the TCP port on 127.0.0.1.
        base_dir: the directory that holds the data and socket directories.
        data_dir: the cluster's data directory.
        socket_dir: the private directory of its Unix socket.
        log_file: the server log, in the data directory.
    """

    def __init__(
        self,
        binaries: PostgresBinaries | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        if binaries is None:
            found = find_binaries()
            if not found:
                raise PostgresNotFound(_NOT_FOUND)
            binaries = found[-1]
        if settings is not None and "port" in settings:
            raise ConfigurationError("set the embedded Postgres port with port=, not settings")
        merged = {**DEFAULT_SETTINGS, **(settings or {})}
        # Checked now, so that a bad setting fails before anything is made or run.
        conf = [_quote_setting(name, value) for name, value in merged.items()]
        self.binaries = binaries
        self.major = binaries.major
        self.port = port if port is not None else _free_port()
        self._run_as = _run_as()
        self._owned_base = base_dir is None
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="walex-cluster-"))
            _chown(base_dir, self._run_as)
        self.base_dir = base_dir
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.data_dir / "postgresql.log"
        conf.append(_quote_setting("port", str(self.port)))
        conf.append(_quote_setting("unix_socket_directories", str(self.socket_dir)))
        self._conf = "".join(line + "\n" for line in conf)
        self._watchdogs: list[subprocess.Popen[bytes]] = []
        self._finalizer = self._arm_finalizer()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<EmbeddedPostgres {self.binaries.version} port={self.port} {state} {self.data_dir}>"
        )

    def __enter__(self) -> EmbeddedPostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the server runs, else None."""
        pid = _read_pid(self.data_dir)
        return pid if pid is not None and _alive(pid) else None

    @property
    def running(self) -> bool:
        """True while the server runs."""
        return self.pid is not None

    def start(self) -> None:
        """Create the cluster if needed, then start it and wait until it accepts connections.

        Does nothing if it already runs; waits first if it is shutting down.

        Raises:
            EmbeddedPostgresError: initdb or the server failed; the message
                has the end of the server log.
        """
        pid = self.pid
        if pid is not None:
            if self._status() != "stopping":
                return
            # A stop is under way (in another thread, or one that timed out).
            self._wait_until_gone(pid)
        if not self._finalizer.alive:
            self._finalizer = self._arm_finalizer()
        self._arm_watchdog()
        self._make_dir(self.base_dir, 0o755)
        self._make_dir(self.socket_dir, 0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        conf = self.data_dir / "walex.conf"
        conf.write_text(self._conf)
        _chown(conf, self._run_as)
        result = self._pg_ctl("start", "-w", "-t", "60", "-l", self.log_file)
        if result.returncode != 0 or not self.running:
            raise EmbeddedPostgresError(
                f"Postgres {self.binaries.version} in {self.data_dir} did not start "
                f"(pg_ctl exit status {result.returncode}): {_output(result)}"
                f"{self._log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and wait until it is gone. Does nothing if it is stopped.

        A fast shutdown waits for every logical replication client to
        confirm the end of the WAL; one that never does holds it up until
        ``wal_sender_timeout`` (60 s) ends its connection.

        Args:
            mode: ``"smart"`` (wait for clients), ``"fast"`` (disconnect
                them, shut down cleanly) or ``"immediate"`` (no shutdown
                checkpoint; recovery on the next start).

        Raises:
            ConfigurationError: an unknown mode.
            EmbeddedPostgresError: the server did not stop.
        """
        if mode not in _STOP_MODES:
            raise ConfigurationError(f"stop mode must be one of {_STOP_MODES}, got {mode!r}")
        pid = self.pid
        if pid is None:
            return
        # pg_ctl's own wait (-w) watches postmaster.pid, and gives up if a new
        # server writes one meanwhile; the postmaster's pid is what to watch.
        result = self._pg_ctl("stop", "-W", "-m", mode)
        if result.returncode != 0 and self.running:
            raise EmbeddedPostgresError(
                f"Postgres in {self.data_dir} did not stop: {_output(result)}{self._log_tail()}"
            )
        self._wait_until_gone(pid)

    def restart(self) -> None:
        """Stop the server (fast mode) and start it again, on the same port and data."""
        self.stop("fast")
        self.start()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and its backends.

        Returns once every process is gone, so that :meth:`start` can run at
        once (it then does crash recovery). Committed transactions survive,
        as ``synchronous_commit`` is on. Does nothing if it is stopped.
        """
        pid = self.pid
        if pid is None:
            return
        _kill_server(pid)
        # Lock files naming a dead pid are harmless unless the pid is reused
        # by another process of the same user (the system cluster's, say),
        # which would make the next start refuse.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Stop the server if it runs and remove every file of the cluster."""
        with contextlib.suppress(EmbeddedPostgresError):
            # No shutdown checkpoint: the files are removed next.
            self.stop("immediate")
        if self.running:
            self.kill()
        self._finalizer.detach()
        if self._owned_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        _dismiss(self._watchdogs)

    def dsn(self, dbname: str = "postgres", **params: str) -> str:
        """A libpq connection string for a database of this cluster.

        Args:
            dbname: the database.
            **params: more libpq parameters, such as ``application_name``.

        Example:
            >>> pg.dsn("shop", application_name="demo")  # doctest: +SKIP
            'host=127.0.0.1 port=54321 user=postgres dbname=shop application_name=demo'
        """
        base = {"host": _HOST, "port": str(self.port), "user": _USER, "dbname": dbname}
        return make_conninfo("", **{**base, **params})

    def create_database(self, name: str) -> str:
        """Create a database and return its connection string.

        Raises:
            EmbeddedPostgresError: the server refused, for example because it exists.
        """
        try:
            with self._connect() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise EmbeddedPostgresError(f"could not create database {name!r}: {exc}") from exc
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, whatever still uses it. Does nothing if it does not exist.

        Its connections are terminated, its prepared transactions rolled
        back and its replication slots dropped (their walsenders terminated
        first): each of them would make ``DROP DATABASE`` fail.

        Raises:
            EmbeddedPostgresError: the database could not be dropped.
        """
        deadline = time.monotonic() + 30
        while True:
            try:
                self._drop_database_once(name)
                return
            except psycopg.errors.ObjectInUse as exc:
                # A terminated walsender releases its slot a moment later.
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(f"could not drop database {name!r}: {exc}") from exc
                time.sleep(0.02)
            except psycopg.Error as exc:
                raise EmbeddedPostgresError(f"could not drop database {name!r}: {exc}") from exc

    def _drop_database_once(self, name: str) -> None:
        with self._connect() as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                return
            gids = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = %s", [name]
            ).fetchall()
            if gids:
                # ROLLBACK PREPARED only works from the transaction's database.
                with self._connect(name) as there:
                    for (gid,) in gids:
                        there.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = %s AND active_pid IS NOT NULL",
                [name],
            )
            slots = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [name]
            ).fetchall()
            for (slot,) in slots:
                # A temporary slot goes away with its walsender.
                with contextlib.suppress(psycopg.errors.UndefinedObject):
                    conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _arm_finalizer(
        self,
    ) -> weakref.finalize[
        [Path, Path, _RunAs | None, Path | None, list[subprocess.Popen[bytes]]], EmbeddedPostgres
    ]:
        return weakref.finalize(
            self,
            _stop_at_exit,
            self.binaries.bindir / "pg_ctl",
            self.data_dir,
            self._run_as,
            self.base_dir if self._owned_base else None,
            self._watchdogs,
        )

    def _arm_watchdog(self) -> None:
        """Start the watchdog (see process._WATCHDOG) unless one is on duty."""
        if any(dog.poll() is None for dog in self._watchdogs):
            return
        self._watchdogs.append(
            _start_watchdog(
                self.binaries.bindir / "pg_ctl",
                self.data_dir,
                self._run_as,
                self.base_dir if self._owned_base else None,
            )
        )

    def _connect(self, dbname: str = "postgres") -> psycopg.Connection[TupleRow]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10)

    def _make_dir(self, path: Path, mode: int) -> None:
        if not path.is_dir():
            path.mkdir(mode=mode, parents=True)
            _chown(path, self._run_as)

    def _initdb(self) -> None:
        self._make_dir(self.data_dir, 0o700)
        result = _run(
            [
                self.binaries.bindir / "initdb",
                "-D",
                self.data_dir,
                "-U",
                _USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                # fsync of every file: seconds, for a cluster that is thrown away.
                "--no-sync",
            ],
            self._run_as,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb ({self.binaries.version}) failed in {self.data_dir}: {_output(result)}"
            )
        # Our settings live in their own file, rewritten on every start;
        # ALTER SYSTEM (postgresql.auto.conf) still overrides them.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'walex.conf'\n")

    def _pg_ctl(self, command: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return _run(
            [self.binaries.bindir / "pg_ctl", command, "-D", self.data_dir, *args], self._run_as
        )

    def _status(self) -> str | None:
        """The postmaster's state: "starting", "ready", "stopping"... or None."""
        return _read_status(self.data_dir)

    def _wait_until_gone(self, pid: int) -> None:
        deadline = time.monotonic() + _STOP_TIMEOUT
        while _alive(pid):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"Postgres in {self.data_dir} is still shutting down after "
                    f"{_STOP_TIMEOUT} s{self._log_tail()}"
                )
            time.sleep(0.01)

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"\n--- the end of {self.log_file} ---\n{tail}" if tail else ""


@contextlib.contextmanager
def database_or_embedded(dsn: str | None, name: str = "walex") -> Iterator[str]:
    """*dsn* itself, or a new database on a throw-away local Postgres.

    For examples and demos that run against the user's database when given
    one, and otherwise against a server of their own, removed afterwards.

    Example::

        with database_or_embedded(args.dsn, "quickstart") as dsn:
            ...
    """
    if dsn is not None:
        yield dsn
        return
    with EmbeddedPostgres() as server:
        yield server.create_database(name)

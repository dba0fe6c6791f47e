"""A throw-away local Postgres for the demo, the tests and the benchmarks.

:class:`EmbeddedPostgres` runs ``initdb`` and ``pg_ctl`` on a free port of
127.0.0.1 with a private socket directory and ``wal_level=logical``, from the
Postgres binaries that :func:`find_binaries` finds: the system's, or those
that the ``pgserver`` wheel ships (``pip install "walex[embedded]"``).

Postgres refuses to run as root. When the current user is root, the server
and its tools run as the ``postgres`` system user, or ``nobody`` when there
is none; the files they need are created for that user.

No server outlives the process that started it: :meth:`EmbeddedPostgres.cleanup`
(or leaving the ``with`` block) removes it; at exit, a finalizer stops what
was left running; and a process killed by a signal, which runs no
finalizer, leaves a small watchdog process behind that does the same.

Example:
    >>> with EmbeddedPostgres() as pg:  # doctest: +SKIP
    ...     dsn = pg.create_database("shop")
    ...     # stream from dsn ...
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from .errors import ConfigurationError, EmbeddedPostgresError, PostgresNotFound

__all__ = [
    "DEFAULT_SETTINGS",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PostgresBinaries",
    "PostgresNotFound",
    "database_or_embedded",
    "find_binaries",
]

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
_VERSION = re.compile(r"\(PostgreSQL\)\s+((\d+)(?:\.(\d+))?\S*)")
_STOP_MODES = ("smart", "fast", "immediate")
_LOG_TAIL_LINES = 30
# Longer than the default wal_sender_timeout, which bounds how long a
# logical replication client can hold up a fast shutdown.
_STOP_TIMEOUT = 90
_PROC = Path("/proc")


class PostgresBinaries(NamedTuple):
    """One Postgres installation: where its programs are and its version.

    Attributes:
        major: the major version, such as ``16``.
        version: the full version, such as ``"16.2"``.
        bindir: the directory with ``initdb``, ``pg_ctl`` and ``postgres``.
    """

    major: int
    version: str
    bindir: Path


class _RunAs(NamedTuple):
    """The unprivileged OS user that runs Postgres when we are root."""

    name: str
    uid: int
    gid: int


def _run_as() -> _RunAs | None:
    """Who runs the Postgres programs: ``None`` means the current user."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd  # Unix only, and only needed when root.

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return _RunAs(name, entry.pw_uid, entry.pw_gid)
    raise EmbeddedPostgresError(
        "Postgres refuses to run as root, and there is neither a 'postgres' "
        "nor a 'nobody' user to run it as"
    )


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... of the caller's environment would redirect
    # the tools (postgres itself reads PGPORT) to another cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run(
    args: list[str | Path], run_as: _RunAs | None, *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a program, as ``run_as`` when given, and capture its output."""
    return subprocess.run(
        [str(arg) for arg in args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        env=_clean_env(),
        # The unprivileged user may not be able to enter the current directory.
        cwd="/",
        timeout=timeout,
        user=run_as.uid if run_as else None,
        group=run_as.gid if run_as else None,
        # Otherwise the child keeps root's supplementary groups.
        extra_groups=[] if run_as else None,
    )


def _chown(path: Path, run_as: _RunAs | None) -> None:
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(part.strip() for part in (result.stdout, result.stderr) if part.strip())


# --- finding binaries ---------------------------------------------------------


def _probe(bindir: Path, run_as: _RunAs | None) -> PostgresBinaries | None:
    """The version in ``bindir`` if its programs run for ``run_as``, else None."""
    if not all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
        return None
    found: list[re.Match[str]] = []
    # initdb is run too: it is the program that loads libpq, and a copied or
    # broken install fails there first.
    for tool in ("postgres", "initdb"):
        try:
            result = _run([bindir / tool, "--version"], run_as, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        match = _VERSION.search(result.stdout)
        if result.returncode != 0 or match is None:
            return None
        found.append(match)
    postgres, initdb = found
    if postgres.group(2) != initdb.group(2):
        return None
    return PostgresBinaries(int(postgres.group(2)), postgres.group(1), bindir)


def _system_bindirs() -> Iterator[Path]:
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = _run([pg_config, "--bindir"], None, timeout=30)
            if result.returncode == 0 and result.stdout.strip():
                yield Path(result.stdout.strip())
    for pattern in (
        "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
        "/usr/pgsql-*/bin",  # PGDG RPMs
        "/usr/local/pgsql/bin",  # built from source
        "/opt/homebrew/opt/postgresql@*/bin",
        "/usr/local/opt/postgresql@*/bin",
    ):
        yield from (Path(match) for match in sorted(glob.glob(pattern)))
    initdb = shutil.which("initdb")
    if initdb:
        yield Path(initdb).resolve().parent


def _pgserver_package() -> Path | None:
    # Not imported: importing pgserver warns (about XDG_RUNTIME_DIR) and does
    # work we do not need; its files are all we use.
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _trusted_dir(path: Path) -> bool:
    """True if ``path`` is a directory that only the current user could have written."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        path.is_dir()
        and not path.is_symlink()
        and info.st_uid == os.geteuid()
        and not info.st_mode & 0o022
    )


def _make_world_readable(top: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, 0o755)
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, mode | 0o444 | (0o111 if mode & 0o111 else 0))


def _readable_copy(package: Path, version: str, *, fresh: bool = False) -> Path:
    """Copy pgserver's Postgres where an unprivileged user can run it.

    pgserver lives in site-packages, which is often under root's mode-700
    home. The copy is made once per pgserver install, atomically (copied
    under a temporary name, then renamed), and reused after that.

    Args:
        package: pgserver's package directory.
        version: its Postgres version, for the name of the copy.
        fresh: remove an existing copy first (a /tmp cleaner may have eaten
            part of it).

    Returns:
        The ``bin`` directory of the copy.
    """
    source = package / "pginstall"
    postgres = (source / "bin" / "postgres").stat()
    key = f"{source.resolve()}\0{postgres.st_mtime_ns}\0{postgres.st_size}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    target = Path(tempfile.gettempdir()) / f"walex-pg-{version}-{digest}"
    # The binaries' RPATH is $ORIGIN/../../../pgserver.libs (where the wheel
    # keeps libpq), so the copy keeps the wheel's layout.
    bindir = target / "pgserver" / "pginstall" / "bin"
    if fresh and _trusted_dir(target):
        shutil.rmtree(target, ignore_errors=True)
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            shutil.copytree(source, staging / "pgserver" / "pginstall", symlinks=True)
            libs = package.parent / "pgserver.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / "pgserver.libs", symlinks=True)
            _make_world_readable(staging)
            try:
                staging.rename(target)
            except OSError:
                if not target.exists():
                    raise
                # Another process made the same copy first.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    # /tmp is shared: run nothing that another user could have put there.
    if not _trusted_dir(target):
        raise EmbeddedPostgresError(
            f"refusing to run Postgres from {target}: it is not owned by this user "
            "or others may write to it; remove it and try again"
        )
    return bindir


def _pgserver_binaries(run_as: _RunAs | None) -> PostgresBinaries | None:
    package = _pgserver_package()
    if package is None or not (package / "pginstall" / "bin" / "postgres").is_file():
        return None
    found = _probe(package / "pginstall" / "bin", run_as)
    if found is not None or run_as is None:
        return found
    as_root = _probe(package / "pginstall" / "bin", None)
    if as_root is None:
        return None
    copied = _probe(_readable_copy(package, as_root.version), run_as)
    if copied is None:
        copied = _probe(_readable_copy(package, as_root.version, fresh=True), run_as)
    return copied


def _version_key(binaries: PostgresBinaries) -> tuple[int, int]:
    parts = binaries.version.split(".")
    minor = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    return binaries.major, minor


def find_binaries() -> list[PostgresBinaries]:
    """Find every usable Postgres installation.

    Looks at the system's (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``
    and other usual places, the ``initdb`` on ``PATH``) and at the one that the
    ``pgserver`` wheel ships. When running as root, pgserver's copy is first
    copied to a place the unprivileged user can read. An installation counts
    only if its programs run for the user that will run the server.

    Returns:
        One installation per major version, the newest minor version (the
        system's on a tie), sorted by major version. Empty if none is found.
    """
    run_as = _run_as()
    candidates: list[PostgresBinaries] = []
    seen: set[Path] = set()
    for bindir in _system_bindirs():
        resolved = bindir.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        found = _probe(resolved, run_as)
        if found is not None:
            candidates.append(found)
    bundled = _pgserver_binaries(run_as)
    if bundled is not None:
        candidates.append(bundled)
    best: dict[int, PostgresBinaries] = {}
    for found in candidates:
        current = best.get(found.major)
        if current is None or _version_key(found) > _version_key(current):
            best[found.major] = found
    return [best[major] for major in sorted(best)]


# --- one cluster --------------------------------------------------------------


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


def _read_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """A process's state letter and process group, from /proc; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; after it come
    # state, ppid, pgrp.
    state, _ppid, pgrp = text.rpartition(")")[2].split()[:3]
    return state, int(pgrp)


def _signal_reaches(send: Callable[[], None]) -> bool:
    try:
        send()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A killed process that nobody reaped stays a zombie ("Z"): some container
# init processes never reap. /proc tells zombies apart; kill(pid, 0) cannot.
_GONE = ("Z", "X")


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    if not _PROC.is_dir():
        return _signal_reaches(lambda: os.kill(pid, 0))
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in _GONE


def _group_alive(pgid: int) -> bool:
    """True while any live process is in process group ``pgid``."""
    if not _PROC.is_dir():
        return _signal_reaches(lambda: os.killpg(pgid, 0))
    for entry in _PROC.iterdir():
        stat = _proc_stat(entry.name) if entry.name.isdigit() else None
        if stat is not None and stat[1] == pgid and stat[0] not in _GONE:
            return True
    return False


def _stop_at_exit(
    pg_ctl: Path,
    data_dir: Path,
    run_as: _RunAs | None,
    owned: Path | None,
    watchdogs: list[subprocess.Popen[bytes]],
) -> None:
    """Stop a cluster that its owner forgot, so that no server outlives us."""
    pid = _read_pid(data_dir)
    if pid is not None and _alive(pid):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run([pg_ctl, "stop", "-D", data_dir, "-m", "immediate", "-w"], run_as, timeout=60)
    if owned is not None:
        shutil.rmtree(owned, ignore_errors=True)
    _dismiss(watchdogs)


# The finalizer above runs when the owning process exits normally; a process
# killed by a signal (SIGKILL, or SIGTERM with no handler) runs nothing. So a
# running cluster also has a watchdog: a small process that reads its stdin
# until the owner's end of the pipe closes, which happens however the owner
# exits. If the owner did not write "done" first, the watchdog does what the
# finalizer would have done. It is a script of its own, not an import of
# _stop_at_exit: it starts in milliseconds with only the standard library,
# and works whatever sys.path the owner had (``-I`` ignores PYTHONPATH).
_WATCHDOG = """\
import os, shutil, subprocess, sys
pg_ctl, data_dir, owned, uid, gid = sys.argv[1:]
if sys.stdin.buffer.read():
    sys.exit(0)
if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
    user = {"user": int(uid), "group": int(gid), "extra_groups": []} if uid else {}
    try:
        subprocess.run(
            [pg_ctl, "stop", "-D", data_dir, "-m", "immediate", "-w"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd="/", timeout=60, **user,
        )
    except (OSError, subprocess.SubprocessError):
        pass
if owned:
    shutil.rmtree(owned, ignore_errors=True)
"""


def _dismiss(watchdogs: list[subprocess.Popen[bytes]]) -> None:
    """Tell the watchdogs that the owner cleaned up, and let them go."""
    while watchdogs:
        dog = watchdogs.pop()
        if dog.stdin is not None:
            with contextlib.suppress(OSError):  # it is gone already
                dog.stdin.write(b"done")
                dog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            dog.wait(timeout=10)


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
        # Backends outlive a killed postmaster until they notice, and a new
        # postmaster refuses to start while they hold the old shared memory.
        # pg_ctl makes the postmaster a process group leader, so the group
        # is exactly the server.
        try:
            group = os.getpgid(pid) == pid
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            group = False  # it died on its own meanwhile
        deadline = time.monotonic() + 30
        while _group_alive(pid) if group else _alive(pid):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"Postgres (pid {pid}) did not die after SIGKILL")
            time.sleep(0.01)
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
        """Start the watchdog (see _WATCHDOG) unless one is on duty."""
        if any(dog.poll() is None for dog in self._watchdogs):
            return
        run_as = self._run_as
        self._watchdogs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-c",
                    _WATCHDOG,
                    str(self.binaries.bindir / "pg_ctl"),
                    str(self.data_dir),
                    str(self.base_dir) if self._owned_base else "",
                    str(run_as.uid) if run_as else "",
                    str(run_as.gid) if run_as else "",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=_clean_env(),
                cwd="/",
                # Out of the terminal's process group: a Ctrl-C meant for
                # the owner must not take the watchdog with it.
                start_new_session=True,
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
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        # Line 8 of postmaster.pid (Postgres 10+) is the postmaster's status.
        return lines[7].strip() if len(lines) > 7 else None

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

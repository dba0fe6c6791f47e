"""The server's processes: pid files, /proc checks, signals, and no server left behind.

This module owns what is known about a running postmaster from outside it
(its pid file, whether it or its process group is alive), the SIGKILL of a
whole server, and the two guards that stop a cluster its owner did not clean
up: the finalizer run at a normal exit and the watchdog process that outlives
an owner killed by a signal. It must not create, configure or start a
cluster; the watchdog's script must import nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import EmbeddedPostgresError
from .binaries import _clean_env, _run, _RunAs

_PROC = Path("/proc")


def _read_pid(data_dir: Path) -> int | None:
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def _read_status(data_dir: Path) -> str | None:
    """The postmaster's state: "starting", "ready", "stopping"... or None."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    # Line 8 of postmaster.pid (Postgres 10+) is the postmaster's status.
    return lines[7].strip() if len(lines) > 7 else None


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


def _kill_server(pid: int) -> None:
    """SIGKILL a postmaster and its backends, and wait until every one is gone.

    Raises:
        EmbeddedPostgresError: a process outlived the signal by 30 s.
    """
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


# --- no server outlives its owner ---------------------------------------------


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


def _start_watchdog(
    pg_ctl: Path, data_dir: Path, run_as: _RunAs | None, owned: Path | None
) -> subprocess.Popen[bytes]:
    """Start a watchdog (see _WATCHDOG) for one cluster; the caller keeps its pipe."""
    return subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-c",
            _WATCHDOG,
            str(pg_ctl),
            str(data_dir),
            str(owned) if owned is not None else "",
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

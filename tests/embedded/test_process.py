"""walex.embedded.process: a killed owner's watchdog stops its server; cleanup dismisses it."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.embedded.helpers import gone
from walex.embedded import EmbeddedPostgres
from walex.embedded.process import _WATCHDOG

_OWNER = """
import signal, sys, time
from walex.embedded import EmbeddedPostgres, find_binaries
major = int(sys.argv[1])
pg = EmbeddedPostgres(next(b for b in find_binaries() if b.major == major))
pg.start()
print(pg.pid, pg.base_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_owner_leaves_no_server_behind(pg_server: EmbeddedPostgres, sig: int) -> None:
    # The owner dies without running a finalizer: its watchdog stops the
    # server and removes the cluster's files.
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(pg_server.major)],
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        try:
            assert owner.stdout is not None
            pid_text, base = owner.stdout.readline().split()
            pid, base_dir = int(pid_text), Path(base)
            assert not gone(pid)
            assert base_dir.is_dir()
        finally:
            owner.send_signal(sig)
            owner.wait(10)
    assert owner.returncode == -sig
    deadline = time.monotonic() + 60
    while not (gone(pid) and not base_dir.exists()):
        assert time.monotonic() < deadline, "the server outlived its owner"
        time.sleep(0.05)


def test_cleanup_dismisses_the_watchdog(pg_server: EmbeddedPostgres) -> None:
    pg = EmbeddedPostgres(pg_server.binaries)
    pg.start()
    [dog] = pg._watchdogs
    assert dog.poll() is None
    pg.restart()  # still the same watchdog
    assert pg._watchdogs == [dog]
    pg.cleanup()
    assert dog.returncode == 0  # told "done": it stood down
    assert pg._watchdogs == []
    assert not pg.base_dir.exists()


def test_the_watchdog_needs_only_the_standard_library() -> None:
    # It runs with -I, where an installed walex (perhaps another version
    # than the owner's) would be found instead of the owner's.
    imported: set[str] = set()
    for node in ast.walk(ast.parse(_WATCHDOG)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").partition(".")[0])
    assert imported
    assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names

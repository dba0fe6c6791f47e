"""Helpers that tests share (test modules never import each other).

Fixtures live in ``fix_*.py`` (loaded by conftest.py); plain functions and
classes that several test modules call live here.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pytest

from tests.fix_pg import Database
from walex import WalEx
from walex.lsn import LSN

__all__ = [
    "HOSTILE",
    "SECRET_PIECES",
    "Proc",
    "confirmed_flush",
    "make_app",
    "seed_tables",
    "until",
    "wait_for",
    "walex_proc",
]


class Proc:
    """A ``walex`` subprocess whose output lines are read with a timeout."""

    def __init__(self, args: list[str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "walex", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.lines: dict[str, queue.Queue[str | None]] = {}
        self.seen: dict[str, list[str]] = {}
        self.threads: list[threading.Thread] = []
        # A thread per pipe: select() cannot see what a text pipe has buffered.
        for name in ("stdout", "stderr"):
            q: queue.Queue[str | None] = queue.Queue()
            self.lines[name] = q
            self.seen[name] = []
            pipe = getattr(self.popen, name)
            thread = threading.Thread(target=self._pump, args=(pipe, q), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _pump(pipe: IO[str], q: queue.Queue[str | None]) -> None:
        for line in pipe:
            q.put(line)
        q.put(None)

    def read_line(self, stream: str = "stdout", timeout: float = 20) -> str:
        """The next line; fail after *timeout* seconds or at the end of output."""
        try:
            line = self.lines[stream].get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line on {stream} within {timeout:.0f}s; so far: {self.seen}")
        if line is None:
            self.lines[stream].put(None)
            pytest.fail(f"walex ended (exit {self.popen.wait(10)}); output: {self.seen}")
        self.seen[stream].append(line)
        return line

    def rest(self, stream: str, timeout: float = 10) -> str:
        """What is left of *stream* once the process has ended."""
        out = []
        while (line := self.lines[stream].get(timeout=timeout)) is not None:
            out.append(line)
        self.lines[stream].put(None)
        return "".join(out)

    def stop(self) -> int:
        """Ctrl-C, and the exit code."""
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout=20)


@contextmanager
def walex_proc(*args: str) -> Iterator[Proc]:
    """Run ``walex ARGS`` in a subprocess; kill it if the test fails."""
    proc = Proc(list(args))
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait(timeout=10)
        for thread in proc.threads:
            thread.join(timeout=10)
        for pipe in (proc.popen.stdout, proc.popen.stderr):
            if pipe is not None:
                pipe.close()


def wait_for(proc: Proc, text: str, stream: str = "stderr", timeout: float = 30) -> str:
    """Skip lines until one holds *text*."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.read_line(stream, timeout=max(0.1, deadline - time.monotonic()))
        if text in line:
            return line


# -- apps against a test database ------------------------------------------------


async def until(predicate: Callable[[], bool], within: float = 15.0, what: str = "it") -> None:
    """Wait (without blocking the loop) until *predicate* holds; fail after *within* s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def confirmed_flush(db: Database, slot: str) -> LSN:
    rows = db.fetch(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return LSN.parse(rows[0][0])


def seed_tables(db: Database, identity: str = "FULL") -> str:
    """The seed README's tables and a publication for them; returns the publication."""
    pub = db.unique("events")
    db.execute(
        "CREATE TABLE user_account (id int PRIMARY KEY, email text, name text,"
        " updated_at timestamptz DEFAULT now())"
    )
    db.execute(
        "CREATE TABLE todo (id int PRIMARY KEY, title text, status text DEFAULT 'open',"
        " updated_at timestamptz DEFAULT now())"
    )
    db.execute(f"ALTER TABLE user_account REPLICA IDENTITY {identity}")
    db.execute(f"ALTER TABLE todo REPLICA IDENTITY {identity}")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE user_account, todo")
    return pub


def make_app(db: Database, pub: str, **kw: Any) -> WalEx:
    kw.setdefault("name", db.unique("app"))
    kw.setdefault("retry_delay", 0.01)
    return WalEx(url=db.dsn, publication=pub, **kw)


# -- connection strings that must never show their password ---------------------

# Connection strings libpq cannot read, or that fail, each with a password
# holding "s3cret"; the second item is the start of walex's message.
HOSTILE = [
    ("postgresql://app:50%off-s3cret@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:s3cret@[127.0.0.1/app", "invalid connection string: end of string"),
    ('postgresql://app:s3cret"q@[::1/app', "invalid connection string: end of string"),
    ("postgresql://app:%zzs3cret@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:s3cret€%@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:p@s3cret:x@127.0.0.1:1/app", "could not connect to the server"),
    ("postgresql://app@127.0.0.1:1/app?password=s3cret%zz", "invalid connection string: invalid"),
    ("host=127.0.0.1 port=1 password=s3cret%zz foo=bar", "invalid connection string: invalid c"),
    ("postgresql://app:s3cret@127.0.0.1:1/app", "could not connect to the server"),
    ("host=127.0.0.1 port=1 password='s3 cret' user=app", "could not connect to the server"),
]
# Every piece of "s3cret" that a message might show.
SECRET_PIECES = ("s3c", "cret", "3cr")

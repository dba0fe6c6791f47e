"""Helpers that tests share (test modules never import each other).

Fixtures live in ``fix_*.py`` (loaded by conftest.py); plain functions and
classes that several test modules call live here.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import pytest

__all__ = ["Proc", "wait_for", "walex_proc"]


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

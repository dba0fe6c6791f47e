"""JSON lines to a file or to standard output: one event per line.

It owns writing and fsyncing the file; routing and retries are
:mod:`walex.routing`'s.

Each line is the event's wire form (``docs/wire-format.md``). :meth:`send`
returns after the lines are written to the operating system (``flush``),
and with ``fsync=True`` after they are on disk: only then does a power cut
not lose them. Replays after a crash append the same lines again; the
``id`` field tells them apart.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from typing import IO

from ..errors import ConfigurationError
from ..events import Event
from ..wire import dumpb
from ._base import DestinationError

__all__ = ["JsonLines"]


class JsonLines:
    """Append events as JSON lines to *path*, or write them to stdout.

    Args:
        path: the file to append to; ``"-"`` is standard output.
        fsync: also wait until the lines are on disk (``os.fsync``) before
            a batch counts as delivered.
        name: the name in logs.

    Example::

        await deliver(stream, [JsonLines("changes.jsonl", fsync=True)])
    """

    def __init__(
        self, path: str | os.PathLike[str] = "-", *, fsync: bool = False, name: str = "file"
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ConfigurationError("file destination: path must be a file name or '-'")
        self.path = os.fspath(path)
        self.fsync = bool(fsync)
        self.name = name
        self._file: IO[bytes] | None = None
        # A crash or a failed write can leave half a line: start a new one so
        # that the next event is not glued to it.
        self._newline_first = False

    def __repr__(self) -> str:
        return f"JsonLines({self.path!r}, fsync={self.fsync})"

    async def start(self) -> None:
        """Open the file for appending (creating it)."""
        if self.path == "-":
            self._file = sys.stdout.buffer
            return
        try:
            self._file = await asyncio.to_thread(self._open)
        except OSError as exc:
            raise DestinationError(
                f"cannot open {self.path}: {exc}", destination=self.name, retryable=False
            ) from exc

    async def send(self, events: Sequence[Event]) -> None:
        """Write one line per event; flush (and fsync) before returning."""
        file = self._file
        if file is None:
            await self.start()
            file = self._file
            assert file is not None
        data = b"".join([dumpb(e) + b"\n" for e in events])
        try:
            if self.path == "-":
                file.write(data)
                file.flush()
            else:
                await asyncio.to_thread(self._write, file, data)
                self._newline_first = False
        except OSError as exc:
            raise DestinationError(
                f"cannot write to {self.path}: {exc}", destination=self.name
            ) from exc

    def _open(self) -> IO[bytes]:
        file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        if file.tell() > 0:
            with open(self.path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                self._newline_first = check.read(1) != b"\n"
        return file

    def _write(self, file: IO[bytes], data: bytes) -> None:
        if self._newline_first:
            data = b"\n" + data
        self._newline_first = True
        file.write(data)
        file.flush()
        if self.fsync:
            os.fsync(file.fileno())

    async def close(self) -> None:
        """Close the file (standard output stays open)."""
        file, self._file = self._file, None
        if file is not None and self.path != "-":
            await asyncio.to_thread(file.close)

"""A walex consumer run as a child process by the delivery tests.

Usage: python -m tests.consumer_proc DSN PUBLICATION SLOT LOGFILE [MAX_BATCH [MODE]]

Appends one line per handled event to LOGFILE: ``<commit_lsn> <seq> <id>``,
flushed to the OS before the batch counts as handled, so what the log holds
is what was handled. A kill -9 leaves the file as it was.

MODE ``iterate`` (default) reads ``async for batch in stream``; ``pipelined``
delivers with :func:`walex.destinations.deliver` to a destination that writes
the log, so that several batches are in flight when the kill comes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

import walex
from walex.destinations import deliver


class LogDestination:
    """Writes each event's line, then takes a moment, as a broker's round trip would."""

    name = "log"

    def __init__(self, log: TextIO) -> None:
        self.log = log

    async def start(self) -> None:
        pass

    async def send(self, events: Sequence[walex.Event]) -> None:
        self.log.write("".join(_line(e) for e in events))
        self.log.flush()
        await asyncio.sleep(0.003)

    async def close(self) -> None:
        pass


def _line(e: walex.Event) -> str:
    return f"{int(e.commit_lsn)} {e.seq} {e.new_record['id']}\n"  # type: ignore[index]


async def main(
    dsn: str, publication: str, slot: str, log: TextIO, max_batch: int, mode: str
) -> None:
    async with walex.connect(
        dsn,
        publication=publication,
        slot=slot,
        durable=True,
        max_batch_events=max_batch,
        status_interval=0.2,
    ) as stream:
        print("ready", flush=True)
        if mode == "pipelined":
            await deliver(stream, [LogDestination(log)], window_events=50)
            return
        async for batch in stream:
            log.write("".join(_line(e) for e in batch.events))
            log.flush()


if __name__ == "__main__":
    dsn, pub, slot, logfile = sys.argv[1:5]
    max_batch = int(sys.argv[5]) if len(sys.argv) > 5 else 5000
    mode = sys.argv[6] if len(sys.argv) > 6 else "iterate"
    with open(logfile, "a", buffering=1) as log:
        asyncio.run(main(dsn, pub, slot, log, max_batch, mode))

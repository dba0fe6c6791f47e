"""A walex consumer run as a child process by the delivery tests.

Usage: python -m tests.consumer_proc DSN PUBLICATION SLOT LOGFILE [MAX_BATCH]

Appends one line per handled event to LOGFILE: ``<commit_lsn> <seq> <id>``,
flushed to the OS before the next batch is asked for, so what the log holds
is what was handled. A kill -9 leaves the file as it was.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

import walex


async def main(dsn: str, publication: str, slot: str, log: TextIO, max_batch: int) -> None:
    async with walex.connect(
        dsn,
        publication=publication,
        slot=slot,
        durable=True,
        max_batch_events=max_batch,
        status_interval=0.2,
    ) as stream:
        print("ready", flush=True)
        async for batch in stream:
            lines = [
                f"{int(e.commit_lsn)} {e.seq} {e.new_record['id']}\n"  # type: ignore[index]
                for e in batch.events
            ]
            log.write("".join(lines))
            log.flush()


if __name__ == "__main__":
    dsn, pub, slot, logfile = sys.argv[1:5]
    max_batch = int(sys.argv[5]) if len(sys.argv) > 5 else 5000
    with open(logfile, "a", buffering=1) as log:
        asyncio.run(main(dsn, pub, slot, log, max_batch))

"""A custom destination: any object with ``name``, ``start``, ``send`` and ``close``.

``send`` gets the events of one batch, in commit order, and must return only
once they are safely stored: walex confirms the transaction to Postgres
after that, and sends the batch again after a crash if it did not return.
Raise ``walex.destinations.DestinationError(retryable=False)`` for events
that can never be accepted (the route's ``on_error`` then decides); any
other exception is tried again with backoff.

Run it against a database with a publication ``app``::

    python examples/destinations/custom.py --dsn postgresql://localhost/app

or name it in a walex.toml::

    [[destinations]]
    class = "custom:PrintToLog"     # with examples/destinations on PYTHONPATH
    prefix = "cdc"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Sequence

import walex
from walex.destinations import DestinationError, deliver

log = logging.getLogger("print-to-log")


class PrintToLog:
    """Logs one line per change; keeps them in ``lines`` too."""

    def __init__(self, prefix: str = "walex", *, name: str = "print-to-log") -> None:
        self.name = name
        self.prefix = prefix
        self.lines: list[str] = []

    async def start(self) -> None:
        # Connect to your system here; raise DestinationError when it is down.
        pass

    async def send(self, events: Sequence[walex.Event]) -> None:
        for event in events:
            if event.type == "message":
                continue
            if event.source is None:
                raise DestinationError("a change without a table", retryable=False)
            record = json.dumps(event.record, default=str)
            line = f"{self.prefix} {event.source.name} {event.type} {record}"
            self.lines.append(line)
            log.info(line)
        # Return only when the receiving system has the events.

    async def close(self) -> None:
        pass


async def main(dsn: str, publication: str) -> None:
    async with walex.connect(
        dsn, publication=publication, slot="print_to_log", durable=True
    ) as stream:
        await deliver(stream, [PrintToLog()], retries=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--publication", default="app")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(main(args.dsn, args.publication))

"""walex in one file: stream the changes of a table and print them.

Run it with no arguments to use a throw-away local Postgres (started from the
system's binaries or from the ``pgserver`` wheel: ``pip install "walex[embedded]"``),
or point it at your own database, which needs ``wal_level = logical``::

    python examples/quickstart.py
    python examples/quickstart.py --dsn postgresql://postgres@localhost/app
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import psycopg

import walex
from walex.embedded import database_or_embedded


def database(dsn: str | None) -> contextlib.AbstractContextManager[str]:
    return database_or_embedded(dsn, "quickstart")


def make_changes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO todo (title) VALUES ('write the docs'), ('ship it')")
        with conn.transaction():
            conn.execute("UPDATE todo SET done = true WHERE title = 'ship it'")
            conn.execute("DELETE FROM todo WHERE title = 'write the docs'")
        conn.execute("SELECT pg_logical_emit_message(false, 'quickstart', 'all done')")


async def main(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS todo (id serial PRIMARY KEY, title text NOT NULL,"
            " done boolean NOT NULL DEFAULT false)"
        )
        conn.execute("ALTER TABLE todo REPLICA IDENTITY FULL")  # old rows on update/delete
        if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = 'quickstart'").fetchone():
            conn.execute("CREATE PUBLICATION quickstart FOR TABLE todo")

    async with walex.connect(dsn, publication="quickstart") as stream:
        await asyncio.to_thread(make_changes, dsn)
        async with asyncio.timeout(30):
            async for batch in stream:
                print(f"-- transaction {batch.xid} committed at {batch.commit_timestamp:%H:%M:%S}")
                for event in batch.events:
                    if event.type == "message":
                        print(f"   message {event.prefix}: {event.content!r}")
                        return
                    print(f"   {event.type:<6} {event.table}: {event.record}")
                    if event.changes:
                        print(f"          changed: {event.changes}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="your database (default: a throw-away local Postgres)")
    args = parser.parse_args()
    with database(args.dsn) as dsn:
        asyncio.run(main(dsn))

"""The seed README's example, end to end: tables, the app, some changes.

::

    python examples/seed/main.py                  # a throw-away local Postgres
    python examples/seed/main.py --dsn postgresql://postgres@localhost/app
    python examples/seed/main.py --dsn ... --serve  # keep running until Ctrl-C

Without ``--serve`` it makes a few changes, prints what the handlers saw,
and stops once they have all been handled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import psycopg

from walex.embedded import database_or_embedded

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def database(dsn: str | None) -> contextlib.AbstractContextManager[str]:
    return database_or_embedded(dsn, "example_app")


def create_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((HERE / "schema.sql").read_text())
        if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = 'events'").fetchone():
            conn.execute("CREATE PUBLICATION events FOR TABLE user_account, todo")


def make_changes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO user_account (id, email, name) VALUES (1, 'chase@example.com', 'Chase')"
        )
        conn.execute("UPDATE user_account SET name = 'Chase Pursley' WHERE id = 1")
        conn.execute("UPDATE user_account SET updated_at = now() WHERE id = 1")  # unwatched
        conn.execute("INSERT INTO todo (id, user_account_id, title) VALUES (1, 1, 'write docs')")
        conn.execute("INSERT INTO todo (id, user_account_id, title) VALUES (2, 1, 'old idea')")
        conn.execute("UPDATE todo SET status = 'done' WHERE id = 1")
        conn.execute("UPDATE todo SET status = 'archived' WHERE id = 2")  # unwatched record
        conn.execute("DELETE FROM user_account WHERE id = 1")  # cascades to todo 1 and 2
        conn.execute("SELECT pg_logical_emit_message(true, 'demo', 'done')")


async def demo(dsn: str) -> None:
    from example_app import app

    done = asyncio.Event()

    @app.on_message(prefix="demo")
    async def finished(events: list[object]) -> None:
        done.set()

    async with app:
        await asyncio.to_thread(make_changes, dsn)
        async with asyncio.timeout(60):
            await done.wait()
    print("demo: every change handled and confirmed", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="your database (default: a throw-away local Postgres)")
    parser.add_argument("--serve", action="store_true", help="run until Ctrl-C instead")
    args = parser.parse_args()
    with database(args.dsn) as dsn:
        create_schema(dsn)
        os.environ["WALEX_URL"] = dsn  # what example_app.app reads
        if args.serve:
            from example_app import app

            app.run()
        else:
            asyncio.run(demo(dsn))


if __name__ == "__main__":
    main()

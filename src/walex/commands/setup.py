"""``walex setup``: create the publication, replica identity and slot walex needs.

A command: the plan is :func:`walex.admin.setup_plan`'s; this module prints or
runs it.

Only what is missing is created, so running it again changes nothing.
``--dry-run`` prints the SQL instead of running it. Every name is quoted.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import psycopg

from ..admin import connect_sql, setup_plan
from ..errors import ServerNotReady

__all__ = ["register"]

_EXAMPLE = """\
examples:
  walex setup postgresql://postgres@localhost/app --publication events --tables user_account,todo
  walex setup postgresql://postgres@localhost/app --publication events \\
      --tables public.orders,billing.invoice --replica-identity full --slot orders --dry-run
"""


def register(subparsers: Any) -> None:
    """Add ``walex setup`` to the command line."""
    parser = subparsers.add_parser(
        "setup",
        help="create the publication, replica identity and slot (only what is missing)",
        description=(
            "Create the publication for the tables (or add missing tables to it), "
            "set their REPLICA IDENTITY, and create a durable replication slot. "
            "Idempotent: a second run changes nothing. Needs wal_level = logical "
            "for the slot, and owner rights on the tables."
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dsn", metavar="DSN", help="libpq connection string or URL")
    parser.add_argument("--publication", "-p", required=True, help="the publication's name")
    parser.add_argument(
        "--tables",
        "-t",
        default="",
        metavar="A,B",
        help=(
            'tables (table or schema.table; "double quotes" keep dots), comma-separated; '
            "none means FOR ALL TABLES"
        ),
    )
    parser.add_argument(
        "--replica-identity",
        choices=["full", "default"],
        help="set the tables' REPLICA IDENTITY (full: updates and deletes carry the old row)",
    )
    parser.add_argument("--slot", help="also create this durable replication slot")
    parser.add_argument("--dry-run", action="store_true", help="print the SQL, change nothing")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return asyncio.run(_setup(args))


async def _setup(args: argparse.Namespace) -> int:
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    conn = await connect_sql(args.dsn, application_name="walex-setup")
    try:
        plan = await setup_plan(
            conn,
            publication=args.publication,
            tables=tables,
            replica_identity=args.replica_identity,
            slot=args.slot,
        )
        if not plan:
            print("nothing to do: everything is in place")
            return 0
        for statement in plan:
            text = statement.as_string(conn) + ";"
            if args.dry_run:
                print(text)
                continue
            try:
                await conn.execute(statement)
            except psycopg.errors.DuplicateObject:
                # Made meanwhile by someone else: what we wanted exists.
                print(f"-- already done meanwhile: {text}")
                continue
            except psycopg.Error as exc:
                raise ServerNotReady(
                    f"{text} failed: {exc.diag.message_primary or exc}" + _hint(exc)
                ) from exc
            print(text)
    finally:
        await conn.close()
    return 0


def _hint(exc: psycopg.Error) -> str:
    message = str(exc)
    if "wal_level" in message:
        return "; set wal_level = 'logical' and restart Postgres (see walex doctor)"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return "; run it as the tables' owner or a superuser"
    return ""

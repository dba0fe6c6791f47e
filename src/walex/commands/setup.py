"""``walex setup``: create the publication, replica identity and slot walex needs.

A command: the plan is :func:`walex.admin.setup_plan`'s; this module prints or
runs it.

Only what is missing is created, so running it again changes nothing.
``--dry-run`` prints the SQL instead of running it. Every name is quoted.
Every precondition (rights, ``wal_level``, free slots) is checked before the
first statement runs; the publication and replica identity change in one
transaction, then the slot is made: a failure leaves nothing half done.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import psycopg
from psycopg import sql

from ..admin import connect_sql, setup_plan, setup_problems
from ..errors import ServerNotReady
from ..names import split_names

__all__ = ["register"]

logger = logging.getLogger(__name__)

_EXAMPLE = """\
examples:
  walex setup postgresql://postgres@localhost/app --publication events -t user_account -t todo
  walex setup postgresql://postgres@localhost/app --publication events \\
      --table public.orders --table billing.invoice --replica-identity full --slot orders --dry-run
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
        "--table",
        "-t",
        action="append",
        default=[],
        metavar="TABLE",
        help=(
            'a table (table or schema.table; "double quotes" keep dots); repeat for more; '
            "none means FOR ALL TABLES"
        ),
    )
    # The comma list of earlier versions, kept for scripts; not shown.
    parser.add_argument("--tables", default=None, help=argparse.SUPPRESS)
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
    tables = list(args.table)
    if args.tables is not None:
        logger.warning("--tables a,b is deprecated: give --table once per table")
        tables += split_names(args.tables)
    wanted = {
        "publication": args.publication,
        "tables": tables,
        "replica_identity": args.replica_identity,
        "slot": args.slot,
    }
    conn = await connect_sql(args.dsn, application_name="walex-setup")
    try:
        plan = await setup_plan(conn, **wanted)
        if not plan:
            print("nothing to do: everything is in place")
            return 0
        problems = await setup_problems(conn, **wanted)
        if args.dry_run:
            for statement in plan:
                print(statement.as_string(conn) + ";")
        if problems:
            raise ServerNotReady(
                ("these statements would fail" if args.dry_run else "nothing was changed")
                + ": "
                + "; and ".join(problems)
            )
        if not args.dry_run:
            await _run(conn, plan)
    finally:
        await conn.close()
    return 0


async def _run(conn: psycopg.AsyncConnection[Any], plan: list[sql.Composed]) -> None:
    """The publication and replica identity in one transaction, then the slot.

    Postgres makes a logical slot only outside a transaction that wrote.
    """
    slot = [s for s in plan if _is_slot(s, conn)]
    rest = [s for s in plan if not _is_slot(s, conn)]
    async with conn.transaction():
        for statement in rest:
            await _execute(conn, statement)
    for statement in rest:
        print(statement.as_string(conn) + ";")
    for statement in slot:
        await _execute(conn, statement)
        print(statement.as_string(conn) + ";")


def _is_slot(statement: sql.Composed, conn: psycopg.AsyncConnection[Any]) -> bool:
    return "pg_create_logical_replication_slot" in statement.as_string(conn)


async def _execute(conn: psycopg.AsyncConnection[Any], statement: sql.Composed) -> None:
    text = statement.as_string(conn) + ";"
    try:
        async with conn.transaction():  # a savepoint inside the set-up's transaction
            await conn.execute(statement)
    except psycopg.errors.DuplicateObject:
        # Made meanwhile by someone else: what we wanted exists.
        print(f"-- already done meanwhile: {text}")
    except psycopg.Error as exc:
        raise ServerNotReady(
            f"{text} failed: {exc.diag.message_primary or exc}" + _hint(exc)
        ) from exc


def _hint(exc: psycopg.Error) -> str:
    message = str(exc)
    if "wal_level" in message:
        return "; set wal_level = 'logical' and restart Postgres (see walex doctor)"
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return "; run it as the tables' owner or a superuser"
    return ""

"""``walex demo``: see walex work, with nothing set up.

A command: it uses the public API and :mod:`walex.embedded`, and holds no
logic a program could not reach.

With no arguments the demo starts a throw-away local Postgres with
``wal_level = logical`` (the system's binaries, or those of the ``pgserver``
wheel: ``pip install "walex[embedded]"``), makes the tables ``user_account``
and ``todo``, a publication and ``REPLICA IDENTITY FULL``, then runs a
scripted series of changes and prints each event as it arrives. At the end
it stops the server and removes its files.

``--dsn`` runs the same script against your database, in a schema of its
own that is dropped at the end, with a temporary slot. ``--follow`` keeps
streaming after the script, and prints the command to make your own changes.

The changes are handled by a :class:`walex.app.WalEx` app with one handler
for every change, registered with ``unwatched_fields={"updated_at"}``: the
update that only touches ``updated_at`` never reaches it. The demo also
observes the app (as metrics would) to say what the filter dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from psycopg import sql

from ..admin import check_server, connect_sql, mask_dsn
from ..app import WalEx
from ..embedded import EmbeddedPostgres, find_binaries
from ..errors import ConfigurationError, WalexError
from ..events import Batch, Event
from .tail import format_event, stop_on_signals

__all__ = ["UNWATCHED_FIELDS", "register"]

logger = logging.getLogger(__name__)

# Updates that change only these columns are not shown (WalEx's unwatched_fields).
UNWATCHED_FIELDS = frozenset({"updated_at"})

_STEP_TIMEOUT = 15.0  # seconds to wait for the event of one scripted change

_EXAMPLE = """\
examples:
  walex demo                      # a throw-away Postgres, a scripted series of changes
  walex demo --follow             # ... then keep streaming your own changes until Ctrl-C
  walex demo --dsn postgresql://postgres@localhost/app   # your database (wal_level=logical)
"""


def register(subparsers: Any) -> None:
    """Add ``walex demo`` to the command line."""
    parser = subparsers.add_parser(
        "demo",
        help="watch walex stream a scripted series of changes (no set-up needed)",
        description=(
            "Start a throw-away local Postgres (or use --dsn), make a few tables, "
            "and print each change walex streams: inserts, updates with their diff, "
            "deletes, a truncate and a logical message. An update that only touches "
            "updated_at is filtered out (unwatched_fields)."
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dsn",
        help="run against this database instead (needs wal_level = logical); "
        "the demo's tables live in a schema of their own, dropped at the end",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep streaming after the script, until Ctrl-C",
    )
    parser.set_defaults(func=_main)


@dataclass(frozen=True, slots=True)
class _Step:
    """One scripted change: what it does, in words and in SQL (one transaction)."""

    title: str
    statements: tuple[str, ...]


def _script(schema: str) -> list[_Step]:
    # The embedded demo's tables are in public: plain names read better there.
    q = "" if schema == "public" else sql.Identifier(schema).as_string(None) + "."
    users, todos = f"{q}user_account", f"{q}todo"
    return [
        _Step(
            "insert two users (one transaction)",
            (
                f"INSERT INTO {users} (id, email, name) VALUES "
                "(1, 'ada@example.com', 'Ada'), (2, 'grace@example.com', 'Grace')",
            ),
        ),
        _Step(
            "insert three todos",
            (
                f"INSERT INTO {todos} (id, user_id, title) VALUES "
                "(1, 1, 'write the docs'), (2, 1, 'ship it'), (3, 2, 'fix the bug')",
            ),
        ),
        _Step(
            "update a todo: done, and updated_at",
            (f"UPDATE {todos} SET done = true, updated_at = now() WHERE id = 2",),
        ),
        _Step(
            "update a todo's updated_at only (filtered out: unwatched_fields)",
            (f"UPDATE {todos} SET updated_at = now() + interval '1 second' WHERE id = 3",),
        ),
        _Step(
            "rename a user",
            (f"UPDATE {users} SET name = 'Ada Lovelace', updated_at = now() WHERE id = 1",),
        ),
        _Step("delete a todo", (f"DELETE FROM {todos} WHERE id = 1",)),
        _Step(
            "send a logical message with a new todo (one transaction)",
            (
                f"INSERT INTO {todos} (id, user_id, title) VALUES (4, 2, 'celebrate')",
                "SELECT pg_logical_emit_message(true, 'walex.demo', 'todo 4 is for Grace')",
            ),
        ),
        _Step("truncate the todos", (f"TRUNCATE {todos}",)),
    ]


def _ddl(schema: str) -> list[sql.Composed]:
    s = sql.Identifier(schema)
    return [
        sql.SQL(
            "CREATE TABLE {}.user_account (id int PRIMARY KEY, email text NOT NULL UNIQUE, "
            "name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(s),
        sql.SQL(
            "CREATE TABLE {}.todo (id int PRIMARY KEY, user_id int NOT NULL, "
            "title text NOT NULL, done boolean NOT NULL DEFAULT false, "
            "updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(s),
        # The whole old row on updates and deletes: diffs, and unwatched_fields.
        sql.SQL("ALTER TABLE {}.user_account REPLICA IDENTITY FULL").format(s),
        sql.SQL("ALTER TABLE {}.todo REPLICA IDENTITY FULL").format(s),
    ]


def _main(args: argparse.Namespace) -> int:
    if not args.debug:
        # The demo tells its own story; the engine's info lines would interrupt it.
        logging.getLogger("walex").setLevel(logging.WARNING)
    out = sys.stdout
    if args.dsn is not None:
        return asyncio.run(_demo(args.dsn, args.follow, out, embedded=None))
    with _embedded(out) as (server, dsn):
        return asyncio.run(_demo(dsn, args.follow, out, embedded=server))


@contextlib.contextmanager
def _embedded(out: TextIO) -> Iterator[tuple[EmbeddedPostgres, str]]:
    found = find_binaries()
    if not found:
        raise ConfigurationError(
            "the demo needs Postgres binaries, and none were found: "
            'pip install "walex[embedded]" (or install Postgres), or pass --dsn'
        )
    binaries = found[-1]
    _say(out, f"starting a throw-away Postgres {binaries.version} ({binaries.bindir}) ...")
    started = time.monotonic()
    server = EmbeddedPostgres(binaries)
    try:
        server.start()
        _say(out, f"Postgres is up on port {server.port} ({time.monotonic() - started:.1f}s)")
        dsn = server.create_database("walex_demo")
        yield server, dsn
    finally:
        server.cleanup()
        _say(out, f"stopped Postgres and removed {server.base_dir}")


def _say(out: TextIO, text: str) -> None:
    out.write(f"== {text}\n")
    out.flush()


async def _demo(dsn: str, follow: bool, out: TextIO, embedded: EmbeddedPostgres | None) -> int:
    own_schema = embedded is None
    schema = "public" if embedded is not None else f"walex_demo_{secrets.token_hex(4)}"
    publication = "walex_demo" if embedded is not None else f"{schema}_pub"
    conn = await connect_sql(dsn, application_name="walex-demo")
    try:
        # Check what streaming needs before making anything, so that a server
        # that cannot stream is left as it was.
        await check_server(conn, slot_needed=True)
    except BaseException:
        await conn.close()
        raise
    try:
        await _create(conn, schema, publication, own_schema)
        _say(
            out,
            f"made tables {schema}.user_account and {schema}.todo (REPLICA IDENTITY FULL) "
            f"and publication {publication}",
        )
        return await _stream(dsn, schema, publication, follow, out, conn, embedded)
    finally:
        if own_schema:
            with contextlib.suppress(psycopg.Error):
                await conn.execute(
                    sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication))
                )
                await conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )
            _say(out, f"dropped schema {schema} and publication {publication}")
        await conn.close()


async def _create(
    conn: psycopg.AsyncConnection[Any], schema: str, publication: str, own_schema: bool
) -> None:
    try:
        async with conn.transaction():
            if own_schema:
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            for statement in _ddl(schema):
                await conn.execute(statement)
            await conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}, {}").format(
                    sql.Identifier(publication),
                    sql.Identifier(schema, "user_account"),
                    sql.Identifier(schema, "todo"),
                )
            )
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"could not create the demo's tables and publication: {exc}; the role "
            "needs CREATE on the database"
        ) from exc


class _Printer:
    """Prints what the app's handlers get, and what its filter dropped.

    It is also the app's observer: ``on_batch`` runs once the app has
    handled a batch, which is when the script may make the next change.
    """

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color
        self.handled: asyncio.Queue[Batch] = asyncio.Queue()
        self.shown: set[str] = set()
        self.filtered = 0

    async def show(self, events: list[Event]) -> None:
        """The app's handler for every change and for the demo's messages."""
        for event in events:
            self.out.write(_indent(format_event(event, color=self.color)) + "\n")
            self.shown.add(event.id)
        self.out.flush()

    def on_batch(self, batch: Batch, seconds: float) -> None:
        for event in batch.events:
            if event.id not in self.shown and event.type == "update":
                changed = ", ".join(sorted((event.changes or {}).keys()))
                name = event.source.name if event.source is not None else "?"
                self.out.write(
                    f"   (filtered out: UPDATE {name} changed only {changed}, an unwatched field)\n"
                )
                self.filtered += 1
        self.out.flush()
        self.handled.put_nowait(batch)


def _make_app(dsn: str, schema: str, publication: str, printer: _Printer) -> WalEx:
    app = WalEx(
        "demo",
        url=dsn,
        publication=publication,
        subscriptions=[f"{schema}.user_account", f"{schema}.todo"],
        # Slot names are per server: a random one lets demos run side by side.
        slot_name=f"walex_demo_{secrets.token_hex(4)}",
        durable_slot=False,
        observers=[printer],
        connect_timeout=10,
    )
    app.add_handler(printer.show, "event", "*", unwatched_fields=UNWATCHED_FIELDS, name="demo.show")
    app.add_handler(printer.show, "message", prefix="walex.demo", name="demo.show_message")
    return app


async def _stream(
    dsn: str,
    schema: str,
    publication: str,
    follow: bool,
    out: TextIO,
    conn: psycopg.AsyncConnection[Any],
    embedded: EmbeddedPostgres | None,
) -> int:
    stop = stop_on_signals()
    printer = _Printer(out, color=out.isatty())
    app = _make_app(dsn, schema, publication, printer)
    if not await _start_or_stop(app, stop):
        return 0
    _say(out, "streaming (temporary replication slot); the scripted changes follow")
    try:
        for number, step in enumerate(_script(schema), 1):
            if stop.is_set():
                break
            out.write(f"\n-- step {number}: {step.title}\n")
            for statement in step.statements:
                out.write(f"   sql> {statement}\n")
            out.flush()
            await _run_step(conn, step)
            # The next change only once the app has handled this one, so
            # that the output reads in order.
            await _wait_for(printer.handled, app, stop)
        if not stop.is_set():
            out.write("\n")
            _say(
                out,
                f"done: {len(printer.shown)} events shown, {printer.filtered} filtered out "
                f"(unwatched_fields = {sorted(UNWATCHED_FIELDS)})",
            )
        if follow and not stop.is_set():
            _say(out, "following: make your own changes, e.g. with")
            out.write(f"   {_client_hint(dsn, schema, embedded)}\n")
            _say(out, "Ctrl-C to stop")
            out.flush()
            await _until(stop, app)
    finally:
        await app.stop()
    return 0


async def _start_or_stop(app: WalEx, stop: asyncio.Event) -> bool:
    """Start *app* unless *stop* is set first."""
    starting = asyncio.ensure_future(app.start())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    if starting.cancelled():
        return False
    starting.result()  # raises what start() raised
    return True


async def _until(stop: asyncio.Event, app: WalEx) -> None:
    """Wait for Ctrl-C, or for the app to stop (raising its error)."""
    stopper = asyncio.ensure_future(stop.wait())
    ended = asyncio.ensure_future(app.wait())
    waiting: set[asyncio.Future[Any]] = {stopper, ended}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not ended.done():
            ended.cancel()
    if ended.done() and not ended.cancelled():
        ended.result()


async def _run_step(conn: psycopg.AsyncConnection[Any], step: _Step) -> None:
    async with conn.transaction():
        for statement in step.statements:
            await conn.execute(statement.encode())


async def _wait_for(handled: asyncio.Queue[Batch], app: WalEx, stop: asyncio.Event) -> None:
    """Wait until the app has handled the next transaction; fail if it takes too long."""
    getter = asyncio.ensure_future(handled.get())
    ended = asyncio.ensure_future(app.wait())
    stopper = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {getter, ended, stopper}
    try:
        done, _ = await asyncio.wait(
            waiting, timeout=_STEP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for future in waiting:
            future.cancel()
    if getter in done or stopper in done:
        return
    if ended in done:
        ended.result()  # the app's error, if it failed
        raise WalexError("the app stopped before the demo's changes arrived")
    raise WalexError(
        f"no event arrived within {_STEP_TIMEOUT:g}s of a scripted change; "
        "run walex doctor on the database"
    )


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


def _client_hint(dsn: str, schema: str, embedded: EmbeddedPostgres | None) -> str:
    """A command line that changes the demo's tables."""
    todo = sql.Identifier(schema, "todo").as_string(None)
    example = f"INSERT INTO {todo} (id, user_id, title) VALUES (10, 1, 'mine')"
    # The embedded server trusts local connections: its DSN has no secret.
    target = dsn if embedded is not None else mask_dsn(dsn)
    psql = shutil.which("psql")
    if psql:
        return f"psql {shlex.quote(target)} -c {shlex.quote(example)}"
    code = f"import psycopg; psycopg.connect({target!r}, autocommit=True).execute({example!r})"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"

"""``walex tail``: stream a database's changes to the terminal or to a pipe.

A command on top of :func:`walex.connect` and :mod:`walex.wire`; it holds no
streaming logic of its own.

With ``--format json`` each event is one line of JSON in walex's wire shape
(:mod:`walex.wire`), so that ``walex tail ... --format json | jq`` works.
Without ``--publication`` a publication for the given tables (or for all
tables) is made for the run and dropped when it ends; without ``--slot`` the
slot is temporary. Ctrl-C (or SIGTERM) ends it cleanly, with exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, TextIO

import psycopg
from psycopg import sql

from .. import wire
from ..admin import TableRef, connect_sql, find_tables, mask_dsn, publication_tables
from ..errors import ConfigurationError, ServerNotReady, WalexError
from ..events import Batch, Event
from ..names import quote_name
from ..stream import Stream, connect

__all__ = [
    "format_event",
    "open_or_stop",
    "register",
    "run_until_stopped",
    "stop_on_signals",
    "temporary_publication",
]

logger = logging.getLogger(__name__)

_EXAMPLE = """\
examples:
  walex tail postgresql://postgres@localhost/app --table orders --table customers
  walex tail postgresql://postgres@localhost/app --publication events --format json | jq .
  walex tail "host=db user=cdc dbname=app" --publication events --slot audit_tail
"""

_COLORS = {
    "insert": "32",  # green
    "update": "33",  # yellow
    "delete": "31",  # red
    "truncate": "35",  # magenta
    "message": "36",  # cyan
}


def register(subparsers: Any) -> None:
    """Add ``walex tail`` to the command line."""
    parser = subparsers.add_parser(
        "tail",
        help="print a database's changes as they happen",
        description=(
            "Stream changes to stdout until Ctrl-C. Without --publication, a "
            "publication for the --table tables (or FOR ALL TABLES, which needs a "
            "superuser) is made for this run and dropped at the end. Without --slot "
            "the replication slot is temporary: changes made while tail is not "
            "running are not shown. With --slot the slot is durable and the next "
            "run resumes where this one stopped."
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dsn", metavar="DSN", help="libpq connection string or URL")
    parser.add_argument(
        "--table",
        "-t",
        action="append",
        default=[],
        metavar="TABLE",
        help="only this table (table or schema.table); repeat for more",
    )
    parser.add_argument(
        "--format",
        "-f",
        choices=["pretty", "json"],
        default="pretty",
        help="pretty (default): for people; json: one JSON object per line",
    )
    parser.add_argument("--publication", "-p", help="read this existing publication")
    parser.add_argument(
        "--slot",
        help="a durable replication slot to use (created if missing; kept); needs --publication",
    )
    parser.add_argument(
        "--no-messages",
        dest="messages",
        action="store_false",
        help="leave out logical messages (pg_logical_emit_message)",
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return asyncio.run(_tail(args))


# --- formatting ---------------------------------------------------------------


def _value(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds" if not value.microsecond else "auto")
    if isinstance(value, (date, time, Decimal)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (int, float)):
        return repr(value)
    return str(wire.encode_value(value))


def _record(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "{}"
    return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in record.items()) + "}"


def format_event(event: Event, *, color: bool = False) -> str:
    """One event, readable in a terminal: a head line and an indented body.

    Args:
        event: the change.
        color: use ANSI colours for the event type.

    Returns:
        The text, without a final newline.

    Example::

        INSERT public.todo  12:00:01  lsn 0/1A2B3C8
            {id: 1, title: 'write the docs', done: false}
    """
    kind = event.type.upper()
    if color:
        kind = f"\x1b[1;{_COLORS.get(event.type, '0')}m{kind}\x1b[0m"
    when = event.commit_timestamp.astimezone().strftime("%H:%M:%S")
    if event.type == "message":
        head = f"{kind} {event.prefix}  {when}  lsn {event.lsn}"
        content = event.content or b""
        try:
            text = repr(content.decode())
        except UnicodeDecodeError:
            text = "\\x" + content.hex()
        scope = "in a transaction" if event.transactional else "outside a transaction"
        return f"{head}\n    {text} ({scope})"
    name = event.source.name if event.source is not None else "?"
    head = f"{kind} {name}  {when}  lsn {event.lsn}"
    if event.type == "truncate":
        flags = (("cascade", event.cascade), ("restart identity", event.restart_identity))
        options = [option for option, on in flags if on]
        extra = f" ({', '.join(options)})" if options else ""
        return f"{head}\n    every row{extra}"
    body = [f"    {_record(event.record)}"]
    if event.type == "update":
        changes = event.changes
        if changes is None:
            body.append("    (the old row is not sent: the table's REPLICA IDENTITY is not FULL)")
        elif not changes:
            body.append("    (no column changed)")
        else:
            for column, (old, new) in changes.items():
                body.append(f"    {column}: {_value(old)} -> {_value(new)}")
    if event.unchanged_toast:
        body.append(f"    (unchanged, not sent: {', '.join(sorted(event.unchanged_toast))})")
    return "\n".join([head, *body])


def _use_color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


# --- running -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def temporary_publication(
    dsn: str, tables: Iterable[str], prefix: str = "walex_tail"
) -> AsyncIterator[str]:
    """A publication for *tables* (all tables when empty), dropped on exit.

    Raises:
        ConfigurationError: a table does not exist.
        ServerNotReady: the role may not create the publication.
    """
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await connect_sql(dsn, application_name="walex-tail")
    try:
        refs = await find_tables(conn, list(tables))
        if refs:
            query = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(r.identifier for r in refs)
            )
        else:
            query = sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(name))
        try:
            await conn.execute(query)
        except psycopg.errors.InsufficientPrivilege as exc:
            what = "FOR ALL TABLES needs a superuser" if not refs else "the role lacks CREATE"
            raise ServerNotReady(
                f"could not create a publication ({what}: {exc.diag.message_primary}); "
                "pass --table, or create one and pass --publication"
            ) from exc
        except psycopg.Error as exc:
            raise ServerNotReady(f"could not create a publication: {exc}") from exc
        logger.debug("created publication %s", name)
        yield name
    finally:
        await _drop_publication(dsn, conn, name)


async def _drop_publication(dsn: str, conn: psycopg.AsyncConnection[Any], name: str) -> None:
    """Drop the run's publication; over a new connection if the old one broke."""
    query = sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name))
    problem: Exception | None = None
    for _ in range(2):
        try:
            if conn.closed:
                conn = await connect_sql(dsn, connect_timeout=10, application_name="walex-tail")
            await conn.execute(query)
            logger.debug("dropped publication %s", name)
            problem = None
            break
        except (psycopg.OperationalError, WalexError) as exc:
            # A catalog connection idle for hours may have been cut.
            problem = exc
            await conn.close()
        except psycopg.Error as exc:
            problem = exc
            break
    await conn.close()
    if problem is not None:
        logger.warning(
            "could not drop the publication %s made for this run (%s); drop it with "
            "DROP PUBLICATION %s;",
            name,
            " ".join(str(problem).split()),
            sql.Identifier(name).as_string(None),
        )


async def run_until_stopped(
    stream: Stream,
    on_batch: Callable[[Batch], bool | None],
    stop: asyncio.Event,
) -> None:
    """Hand each batch to *on_batch* until *stop* is set or it returns True.

    Each batch is handled (counts as confirmed) once *on_batch* returns. A
    stop while waiting for the next batch abandons only that wait.
    """
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            following = asyncio.ensure_future(anext(stream))
            await asyncio.wait({following, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await following
                return
            try:
                batch = following.result()
            except StopAsyncIteration:
                return
            if on_batch(batch):
                return
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper


async def open_or_stop(stream: Stream, stop: asyncio.Event) -> bool:
    """Open *stream* unless *stop* is set first (opening may wait as a standby).

    Returns:
        True when the stream is open; False when stopped first (it is closed then).
    """
    opening = asyncio.ensure_future(stream.open())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({opening, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
            await stream.aclose()
    if opening.cancelled():
        return False
    exc = opening.exception()
    if exc is not None:
        await stream.aclose()
        raise exc
    return True


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (Ctrl-C ends the loop, not the process)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _check_published(
    conn: psycopg.AsyncConnection[Any], dsn: str, publication: str, refs: Sequence[TableRef]
) -> None:
    """Raise when a table asked for is not in the publication (it would show nothing)."""
    existing = await publication_tables(conn, publication)
    if existing is None or existing[0]:
        return  # a missing publication is the stream's error to report; ALL TABLES has all
    missing = [r for r in refs if (r.schema, r.name) not in existing[1]]
    if missing:
        names = ", ".join(r.qualified for r in missing)
        options = [word for r in missing for word in ("--table", _name(r))]
        fix = shlex.join(["walex", "setup", mask_dsn(dsn), "--publication", publication, *options])
        raise ConfigurationError(
            f"{names} {'is' if len(missing) == 1 else 'are'} not in publication "
            f"{publication!r}, so nothing of {'it' if len(missing) == 1 else 'them'} would "
            f"show; add {'it' if len(missing) == 1 else 'them'}: {fix}"
        )


def _name(ref: TableRef) -> str:
    return f"{quote_name(ref.schema)}.{quote_name(ref.name)}"


def _matcher(tables: Sequence[TableRef]) -> Callable[[Event], bool]:
    """Whether an event belongs to one of *tables* (messages always do; none: every event)."""
    if not tables:
        return lambda event: True
    # The tables as the catalog names them: no second reading of what was typed.
    wanted = {(ref.schema, ref.name) for ref in tables}
    return lambda e: e.source is None or (e.source.schema, e.source.table) in wanted


async def _tail(args: argparse.Namespace) -> int:
    out: TextIO = sys.stdout
    color = args.format == "pretty" and _use_color(out)
    stop = stop_on_signals()
    keep = _matcher([])  # the whole publication, unless --table narrows it below
    as_json = args.format == "json"

    def show(batch: Batch) -> bool:
        lines = [
            wire.dumps(e) if as_json else format_event(e, color=color)
            for e in batch.events
            if keep(e)
        ]
        if lines:
            try:
                out.write("\n".join(lines) + "\n")
                out.flush()
            except BrokenPipeError:
                # `| head` closed the pipe: nothing more to do. Point stdout at
                # /dev/null so that Python's final flush does not complain.
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
                stop.set()
                return True
        return False

    if args.slot is not None and args.publication is None:
        # The publication made for one run is dropped at its end, and a
        # durable slot cannot decode a publication created after its position.
        raise ConfigurationError(
            "--slot needs --publication: a durable slot needs a publication that outlives "
            "this run; create one with walex setup DSN --publication NAME --table TABLE"
        )
    async with contextlib.AsyncExitStack() as stack:
        publication = args.publication
        if publication is None:
            publication = await stack.enter_async_context(
                temporary_publication(args.dsn, args.table)
            )
        elif args.table:
            # Fail early on a typo, or a table the publication does not carry,
            # instead of waiting forever for changes.
            conn = await connect_sql(args.dsn, application_name="walex-tail")
            try:
                refs = await find_tables(conn, args.table)
                await _check_published(conn, args.dsn, publication, refs)
                keep = _matcher(refs)
            finally:
                await conn.close()
        stream = connect(
            args.dsn,
            publication=publication,
            slot=args.slot,
            durable=args.slot is not None,
            messages=args.messages,
        )
        if not await open_or_stop(stream, stop):
            return 0
        print(
            f"walex tail: streaming {mask_dsn(args.dsn)} (publication {publication}, "
            f"{'slot ' + args.slot if args.slot else 'temporary slot'}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        async with stream:
            await run_until_stopped(stream, show, stop)
    with contextlib.suppress(BrokenPipeError, ValueError):
        out.flush()
    return 0

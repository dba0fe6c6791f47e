"""``walex slots``: list the server's replication slots, or drop one.

A command: the slots are :mod:`walex.admin`'s; this module prints them or
drops one.

A slot keeps WAL on the server until its consumer confirms it, so a slot
nobody reads any more fills the disk. ``drop`` refuses a slot that a
process streams from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from ..admin import SlotStatus, connect_sql, drop_slot, format_bytes, list_slots

__all__ = ["register"]

_EXAMPLE = """\
examples:
  walex slots postgresql://postgres@localhost/app
  walex slots postgresql://postgres@localhost/app --format json
  walex slots postgresql://postgres@localhost/app drop old_consumer
"""


def register(subparsers: Any) -> None:
    """Add ``walex slots`` to the command line."""
    parser = subparsers.add_parser(
        "slots",
        help="list replication slots (plugin, activity, lag, wal_status) or drop one",
        description=(
            "list (the default): every replication slot of the server, with its "
            "plugin, the process streaming from it, how far its consumer is behind "
            "(lag), the WAL it keeps and its wal_status. drop NAME: drop an idle slot."
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dsn", metavar="DSN", help="libpq connection string or URL")
    parser.add_argument("action", nargs="?", choices=["list", "drop"], default="list")
    parser.add_argument("name", nargs="?", metavar="NAME", help="the slot to drop")
    parser.add_argument("--format", "-f", choices=["text", "json"], default="text")
    parser.set_defaults(func=_main, _parser=parser)


def _main(args: argparse.Namespace) -> int:
    if args.action == "drop" and not args.name:
        args._parser.error("drop needs the slot's NAME: walex slots DSN drop NAME")
    if args.action == "list" and args.name:
        args._parser.error("list takes no NAME")
    return asyncio.run(_slots(args))


async def _slots(args: argparse.Namespace) -> int:
    conn = await connect_sql(args.dsn, application_name="walex-slots")
    try:
        if args.action == "drop":
            await drop_slot(conn, args.name)
            print(f"dropped slot {args.name!r}")
            return 0
        slots = await list_slots(conn)
    finally:
        await conn.close()
    if args.format == "json":
        print(json.dumps([_as_json(s) for s in slots], indent=2))
    elif not slots:
        print("no replication slots")
    else:
        _table(slots)
    return 0


def _as_json(slot: SlotStatus) -> dict[str, Any]:
    return {
        "name": slot.name,
        "plugin": slot.plugin,
        "slot_type": slot.slot_type,
        "database": slot.database,
        "temporary": slot.temporary,
        "active": slot.active,
        "active_pid": slot.active_pid,
        "confirmed_flush_lsn": str(slot.confirmed_flush_lsn) if slot.confirmed_flush_lsn else None,
        "restart_lsn": str(slot.restart_lsn) if slot.restart_lsn else None,
        "lag_bytes": slot.lag_bytes,
        "retained_bytes": slot.retained_bytes,
        "wal_status": slot.wal_status,
        "safe_wal_size": slot.safe_wal_size,
    }


def _table(slots: list[SlotStatus]) -> None:
    header = ("SLOT", "PLUGIN", "DATABASE", "ACTIVE PID", "LAG", "WAL KEPT", "WAL STATUS")
    rows = [
        (
            s.name + (" (temporary)" if s.temporary else ""),
            s.plugin or s.slot_type,
            s.database or "-",
            str(s.active_pid) if s.active_pid is not None else "idle",
            format_bytes(s.lag_bytes) if s.slot_type == "logical" else "-",
            format_bytes(s.retained_bytes),
            s.wal_status or "-",
        )
        for s in slots
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

"""``walex doctor``: is this database ready for walex, and if not, what fixes it?

A command: the checks are :func:`walex.admin.diagnose`'s; this module only
prints them.

Each check prints OK, WARN or FAIL with the SQL or setting that fixes it.
The exit code is 0 when every check is OK, 1 when the worst is a warning and
2 when something fails (3 when the server cannot be reached at all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from ..admin import DEFAULT_LAG_WARN_BYTES, Check, connect_sql, diagnose, mask_dsn, worst
from ..errors import ConnectionFailed

__all__ = ["register"]

_EXAMPLE = """\
examples:
  walex doctor postgresql://postgres@localhost/app
  walex doctor postgresql://postgres@localhost/app --publication events --slot orders
  walex doctor "$DATABASE_URL" -p events -f json | jq '.checks[] | select(.status != "ok")'

exit codes: 0 all OK, 1 warnings, 2 failures (or the server cannot be reached)
"""

_EXIT = {"ok": 0, "warn": 1, "fail": 2}
_LABEL = {"ok": "OK  ", "warn": "WARN", "fail": "FAIL"}
_COLOR = {"ok": "32", "warn": "33", "fail": "31"}


def register(subparsers: Any) -> None:
    """Add ``walex doctor`` to the command line."""
    parser = subparsers.add_parser(
        "doctor",
        help="check that a database is ready to stream, and say what fixes it",
        description=(
            "Check the server version, wal_level, free replication slots and WAL "
            "senders, the REPLICATION right, the publication and its tables' replica "
            "identity, and every replication slot (activity, lag, wal_status)."
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dsn", metavar="DSN", help="libpq connection string or URL")
    parser.add_argument("--publication", "-p", help="the publication walex will read")
    parser.add_argument("--slot", help="the slot walex will use (it may not exist yet)")
    parser.add_argument(
        "--lag-warn",
        type=int,
        default=DEFAULT_LAG_WARN_BYTES,
        metavar="BYTES",
        help="warn about a slot further behind than this (default: 1 GiB)",
    )
    parser.add_argument("--format", "-f", choices=["text", "json"], default="text")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return asyncio.run(_doctor(args))


async def _doctor(args: argparse.Namespace) -> int:
    try:
        conn = await connect_sql(args.dsn, connect_timeout=10, application_name="walex-doctor")
    except ConnectionFailed as exc:
        checks = [Check("connection", "fail", str(exc), "check the connection string")]
        _print(args, checks)
        return 2
    try:
        checks = [
            Check("connection", "ok", f"{mask_dsn(args.dsn)} as {conn.info.user!r}"),
            *await diagnose(
                conn,
                publication=args.publication,
                slot=args.slot,
                lag_warn_bytes=args.lag_warn,
            ),
        ]
    finally:
        await conn.close()
    _print(args, checks)
    return _EXIT[worst(checks)]


def _print(args: argparse.Namespace, checks: list[Check]) -> None:
    status = worst(checks)
    if args.format == "json":
        doc = {
            "status": status,
            "checks": [
                {"name": c.name, "status": c.status, "message": c.message, "fix": c.fix}
                for c in checks
            ],
        }
        print(json.dumps(doc, indent=2))
        return
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    for check in checks:
        label = _LABEL[check.status]
        if color:
            label = f"\x1b[1;{_COLOR[check.status]}m{label}\x1b[0m"
        print(f"{label} {check.name}: {check.message}")
        if check.fix and check.status != "ok":
            print(f"     fix: {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    print(f"\n{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)")

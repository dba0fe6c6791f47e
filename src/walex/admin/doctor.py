"""Doctor: every check streaming needs, as findings with their fixes.

What ``walex doctor`` reports, as :func:`diagnose` over a normal connection,
so that programs (a health endpoint, a deployment step) can run the same
checks. It only reads: every fix is shown, never run.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from ..events import REPLICA_IDENTITY
from .setup import publication_tables
from .slots import list_slots, slot_info

__all__ = [
    "DEFAULT_LAG_WARN_BYTES",
    "Check",
    "CheckStatus",
    "diagnose",
    "format_bytes",
    "worst",
]

CheckStatus = Literal["ok", "warn", "fail"]

_STATUS_RANK: dict[str, int] = {"ok": 0, "warn": 1, "fail": 2}

# Lag past which `walex doctor` warns about a slot: WAL the server keeps on disk.
DEFAULT_LAG_WARN_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one `walex doctor` check.

    Attributes:
        name: what was checked (``"wal_level"``, ``"slot orders"``...).
        status: ``"ok"``, ``"warn"`` or ``"fail"``.
        message: what was found.
        fix: the SQL or setting that fixes it, when there is something to fix.
    """

    name: str
    status: CheckStatus
    message: str
    fix: str | None = None


def worst(checks: Sequence[Check]) -> CheckStatus:
    """The worst status among *checks* (``"ok"`` when there are none)."""
    status: CheckStatus = "ok"
    for check in checks:
        if _STATUS_RANK[check.status] > _STATUS_RANK[status]:
            status = check.status
    return status


def format_bytes(n: int | None) -> str:
    """A byte count for people: ``"1.5 GB"``; ``"unknown"`` for ``None``."""
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


async def diagnose(
    conn: psycopg.AsyncConnection[Any],
    *,
    publication: str | None = None,
    slot: str | None = None,
    lag_warn_bytes: int = DEFAULT_LAG_WARN_BYTES,
) -> list[Check]:
    """Check everything streaming needs, as `walex doctor` reports it.

    Args:
        conn: a normal connection to the database to stream from.
        publication: the publication to check, with its tables' replica identity.
        slot: the slot walex will use; it may not exist yet.
        lag_warn_bytes: a slot further behind than this is a warning.

    Returns:
        One :class:`Check` per finding, in a fixed order.
    """
    checks: list[Check] = []
    version = conn.info.server_version
    major = version // 10000
    cur = await conn.execute(
        """
        SELECT version(), current_setting('wal_level'), current_database(), current_user,
               (SELECT rolreplication FROM pg_roles WHERE rolname = current_user),
               (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
               current_setting('max_replication_slots')::int,
               (SELECT count(*) FROM pg_replication_slots)::int,
               current_setting('max_wal_senders')::int,
               (SELECT count(*) FROM pg_stat_replication)::int
        """
    )
    row = await cur.fetchone()
    assert row is not None
    full, wal_level, database, user, rolrepl, rolsuper = row[:6]
    max_slots, used_slots, max_senders, used_senders = row[6:]
    short = str(full).split(",")[0]
    if version < 100000:
        checks.append(
            Check("server version", "fail", f"{short}: walex needs 10 or newer", "upgrade Postgres")
        )
    elif version < 140000:
        checks.append(
            Check(
                "server version",
                "warn",
                f"{short}: streaming of large transactions and binary values need 14+, "
                "two-phase 15+",
                "upgrade Postgres to 14 or newer for all features",
            )
        )
    else:
        checks.append(Check("server version", "ok", short))

    if wal_level == "logical":
        checks.append(Check("wal_level", "ok", "logical"))
    else:
        checks.append(
            Check(
                "wal_level",
                "fail",
                f"{wal_level}: logical replication needs 'logical'",
                "ALTER SYSTEM SET wal_level = 'logical'; then restart Postgres "
                "(managed services: rds.logical_replication = 1 or the like)",
            )
        )

    free_slots = max_slots - used_slots
    slot_exists = slot is not None and await slot_info(conn, slot) is not None
    msg = f"{free_slots} of {max_slots} free"
    if free_slots <= 0 and not slot_exists:
        checks.append(
            Check(
                "max_replication_slots",
                "fail",
                msg,
                "drop unused slots (walex slots DSN drop NAME) or raise "
                "max_replication_slots and restart Postgres",
            )
        )
    else:
        checks.append(Check("max_replication_slots", "ok", msg))

    free_senders = max_senders - used_senders
    msg = f"{free_senders} of {max_senders} free"
    if free_senders <= 0:
        checks.append(
            Check(
                "max_wal_senders",
                "fail",
                msg,
                "ALTER SYSTEM SET max_wal_senders = ...; then restart Postgres",
            )
        )
    else:
        checks.append(Check("max_wal_senders", "ok", msg))

    if rolsuper or rolrepl:
        how = "superuser" if rolsuper else "REPLICATION"
        checks.append(Check("replication right", "ok", f"role {user!r} has {how}"))
    else:
        fix = sql.SQL("ALTER ROLE {} WITH REPLICATION;").format(sql.Identifier(user))
        checks.append(
            Check(
                "replication right",
                "fail",
                f"role {user!r} may not stream changes",
                f"{fix.as_string(conn)} (as a superuser)",
            )
        )

    if publication is not None:
        checks.extend(await _check_publication(conn, publication, database))
    else:
        cur = await conn.execute("SELECT pubname::text FROM pg_publication ORDER BY 1")
        names = [r[0] for r in await cur.fetchall()]
        if names:
            checks.append(
                Check(
                    "publications",
                    "ok",
                    f"{', '.join(names)} (pass --publication to check one and its tables)",
                )
            )
        else:
            checks.append(
                Check(
                    "publications",
                    "warn",
                    f"database {database!r} has no publication",
                    "walex setup DSN --publication NAME --table a --table b",
                )
            )

    checks.extend(await _check_slots(conn, database, slot, lag_warn_bytes, major))
    return checks


async def _check_publication(
    conn: psycopg.AsyncConnection[Any], publication: str, database: str
) -> list[Check]:
    name = f"publication {publication}"
    existing = await publication_tables(conn, publication)
    if existing is None:
        fix = sql.SQL("CREATE PUBLICATION {} FOR TABLE ...;").format(sql.Identifier(publication))
        # The shell reads the command as the server reads the SQL: quoted.
        setup = f"walex setup DSN --publication {shlex.quote(publication)} --table a --table b"
        return [
            Check(
                name,
                "fail",
                f"does not exist in database {database!r}",
                f"{fix.as_string(conn)} or {setup}",
            )
        ]
    all_tables, members = existing
    cur = await conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication "
        "WHERE pubname = %s",
        (publication,),
    )
    flags = await cur.fetchone()
    assert flags is not None
    operations = ("insert", "update", "delete", "truncate")
    ops = [op for op, on in zip(operations, flags, strict=True) if not on]
    scope = "all tables" if all_tables else f"{len(members)} table(s)"
    checks: list[Check] = []
    if not members:
        checks.append(
            Check(
                name,
                "warn",
                f"{scope}, none of them yet: nothing will stream",
                sql.SQL("ALTER PUBLICATION {} ADD TABLE ...;")
                .format(sql.Identifier(publication))
                .as_string(conn),
            )
        )
    elif ops:
        checks.append(
            Check(
                name,
                "warn",
                f"{scope}; it does not publish {', '.join(ops)}",
                sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');")
                .format(sql.Identifier(publication))
                .as_string(conn),
            )
        )
    else:
        listed = ", ".join(f"{schema}.{table}" for schema, table in sorted(members))
        checks.append(Check(name, "ok", f"{scope}: {listed}"))
    if not members:
        return checks
    cur = await conn.execute(
        """
        SELECT pt.schemaname::text, pt.tablename::text, c.relreplident::text,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
          FROM pg_publication_tables pt
          JOIN pg_namespace n ON n.nspname = pt.schemaname
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
         WHERE pt.pubname = %s
         ORDER BY 1, 2
        """,
        (publication,),
    )
    for schema, table, ident, has_pk in await cur.fetchall():
        check_name = f"replica identity {schema}.{table}"
        full_fix = (
            sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL;")
            .format(sql.Identifier(schema, table))
            .as_string(conn)
        )
        kind = REPLICA_IDENTITY.get(ident, ident)
        if kind == "full":
            checks.append(Check(check_name, "ok", "FULL: updates and deletes carry the old row"))
        elif kind == "nothing" or (kind == "default" and not has_pk):
            why = "NOTHING" if kind == "nothing" else "DEFAULT without a primary key"
            checks.append(
                Check(
                    check_name,
                    "fail",
                    f"{why}: Postgres refuses UPDATE and DELETE on the table while the "
                    "publication publishes them",
                    f"{full_fix} (or add a primary key)",
                )
            )
        else:
            key = "the primary key" if kind == "default" else "the index columns"
            checks.append(
                Check(
                    check_name,
                    "warn",
                    f"{kind.upper()}: updates carry no old row (event.changes is None, so "
                    f"filters on changed columns cannot work); deletes carry only {key}",
                    full_fix,
                )
            )
    return checks


async def _check_slots(
    conn: psycopg.AsyncConnection[Any],
    database: str,
    slot: str | None,
    lag_warn_bytes: int,
    major: int,
) -> list[Check]:
    checks: list[Check] = []
    keep: str | None = None
    if major >= 13:
        cur = await conn.execute("SELECT current_setting('max_slot_wal_keep_size')")
        keep_row = await cur.fetchone()
        keep = str(keep_row[0]) if keep_row else None
    slots = await list_slots(conn)
    if slot is not None and not any(s.name == slot for s in slots):
        checks.append(
            Check(f"slot {slot}", "ok", "does not exist yet: walex creates it on its first run")
        )
    for info in slots:
        name = f"slot {info.name}"
        where = "" if info.database in (None, database) else f" (database {info.database})"
        lag = format_bytes(info.lag_bytes if info.slot_type == "logical" else info.retained_bytes)
        drop = f"walex slots DSN drop {shlex.quote(info.name)}" + (
            f" (connected to database {info.database})" if where else ""
        )
        if info.wal_status == "lost":
            checks.append(
                Check(
                    name,
                    "fail",
                    f"invalidated{where}: wal_status = lost, the server removed WAL it "
                    "needed and changes were lost",
                    f"{drop}, then start again and re-read the tables; raise "
                    "max_slot_wal_keep_size",
                )
            )
            continue
        state = f"active (pid {info.active_pid})" if info.active else "inactive"
        desc = f"{state}{where}, {info.plugin or info.slot_type}, lag {lag}"
        if info.wal_status is not None:
            desc += f", wal_status {info.wal_status}"
        if info.wal_status == "unreserved":
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{desc}: the server is about to remove WAL the slot needs",
                    "let its consumer catch up now, or raise max_slot_wal_keep_size",
                )
            )
        elif info.lag_bytes is not None and info.lag_bytes > lag_warn_bytes:
            fix = "let its consumer catch up" if info.active else f"start its consumer, or {drop}"
            checks.append(Check(name, "warn", f"{desc}: the server keeps that much WAL", fix))
        elif not info.active and not info.temporary:
            checks.append(
                Check(
                    name,
                    "warn",
                    f"{desc}: an idle slot keeps WAL on the server until its consumer returns",
                    f"start its consumer, or {drop} if it is no longer used",
                )
            )
        else:
            checks.append(Check(name, "ok", desc))
    if keep is not None:
        idle = [s for s in slots if not s.active and s.wal_status != "lost"]
        if keep == "-1" and idle:
            checks.append(
                Check(
                    "max_slot_wal_keep_size",
                    "warn",
                    "-1 (unlimited): an idle slot can fill the server's disk",
                    "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();",
                )
            )
        elif keep == "-1":
            checks.append(
                Check(
                    "max_slot_wal_keep_size",
                    "ok",
                    "-1 (unlimited): a slot left idle could fill the disk; consider a limit",
                )
            )
        else:
            checks.append(Check("max_slot_wal_keep_size", "ok", keep))
    return checks

"""Checks and set-up over a normal (SQL) connection: is the server ready?

:func:`preflight` runs before walex opens a replication connection, so that a
misconfigured server is reported with what to change instead of as a
protocol error halfway through.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from .errors import (
    ConfigurationError,
    ConnectionFailed,
    NoFreeReplicationSlots,
    PublicationNotFound,
    ReplicationNotPermitted,
    ServerTooOld,
    SlotInUse,
    SlotInvalidated,
    SlotNotFound,
    WalLevelNotLogical,
    connection_failure,
    mask_dsn,
)
from .events import REPLICA_IDENTITY
from .lsn import LSN

__all__ = [
    "DEFAULT_LAG_WARN_BYTES",
    "SLOT_NAME",
    "Check",
    "CheckStatus",
    "ServerFacts",
    "SlotStatus",
    "TableRef",
    "connect_sql",
    "diagnose",
    "drop_slot",
    "find_tables",
    "format_bytes",
    "list_slots",
    "mask_dsn",
    "preflight",
    "publication_tables",
    "setup_plan",
    "slot_info",
    "split_table_name",
    "worst",
]


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What walex learned about the server before streaming."""

    version_num: int
    database: str
    slot: SlotStatus | None


async def connect_sql(
    dsn: str, connect_timeout: float = 30.0, application_name: str = "walex-catalog"
) -> psycopg.AsyncConnection[Any]:
    """A normal autocommit connection, with connection errors made walex's.

    *application_name* names it in ``pg_stat_activity`` (the commands use
    their own, such as ``walex-tail``).
    """
    try:
        return await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, int(connect_timeout)),
            application_name=application_name,
        )
    except psycopg.OperationalError as exc:
        raise connection_error(exc) from exc
    except psycopg.ProgrammingError as exc:
        raise ConnectionFailed(f"invalid connection string: {exc}") from exc


def connection_error(exc: Exception) -> ConnectionFailed:
    """Translate a psycopg connection failure."""
    return connection_failure(str(exc))


async def slot_info(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotStatus | None:
    """The slot named *slot*, or ``None``."""
    found = await list_slots(conn, slot)
    return found[0] if found else None


async def preflight(
    conn: psycopg.AsyncConnection[Any],
    *,
    publications: list[str],
    slot: str,
    durable: bool,
    create_slot: bool,
    binary: bool = False,
    streaming: bool = False,
    two_phase: bool = False,
    origin: str | None = None,
) -> ServerFacts:
    """Check that the server can stream *publications* through *slot*.

    Raises:
        ServerTooOld, WalLevelNotLogical, PublicationNotFound,
        ReplicationNotPermitted, SlotNotFound, SlotInvalidated,
        NoFreeReplicationSlots: each with what to change.
    """
    version = conn.info.server_version
    if version < 100000:
        raise ServerTooOld(f"walex needs Postgres 10 or newer; this server is {version}")
    for option, needed, what in (
        (binary, 140000, "binary=True"),
        (streaming, 140000, "streaming=True"),
        (two_phase, 150000, "two_phase=True"),
        (origin is not None, 160000, "origin="),
    ):
        if option and version < needed:
            raise ServerTooOld(
                f"{what} needs Postgres {needed // 10000} or newer; this server is "
                f"{version // 10000}. Leave the option out."
            )

    cur = await conn.execute(
        """
        SELECT current_setting('wal_level'), current_database(),
               (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
               current_user,
               current_setting('max_replication_slots')::int,
               (SELECT count(*) FROM pg_replication_slots)
        """
    )
    row = await cur.fetchone()
    assert row is not None
    wal_level, database, can_replicate, user, max_slots, used_slots = row
    if wal_level != "logical":
        raise WalLevelNotLogical(
            f"wal_level is {wal_level!r}; logical replication needs 'logical'. Run "
            "ALTER SYSTEM SET wal_level = 'logical'; then restart Postgres "
            "(on managed services set it in the parameter group, e.g. rds.logical_replication = 1)"
        )
    if not can_replicate:
        raise ReplicationNotPermitted(
            f"the role {user!r} may not stream changes; run "
            f'ALTER ROLE "{user}" WITH REPLICATION; (as a superuser)'
        )
    cur = await conn.execute(
        "SELECT pubname::text FROM pg_publication WHERE pubname = ANY(%s)", (publications,)
    )
    found = {r[0] for r in await cur.fetchall()}
    missing = [p for p in publications if p not in found]
    if missing:
        names = ", ".join(repr(p) for p in missing)
        raise PublicationNotFound(
            f"publication {names} does not exist in database {database!r}; create it, e.g. "
            f'CREATE PUBLICATION "{missing[0]}" FOR TABLE my_table; '
            "(or FOR ALL TABLES), or run walex setup"
        )
    info = await slot_info(conn, slot)
    if info is not None:
        if info.slot_type != "logical" or info.plugin != "pgoutput":
            raise SlotInvalidated(
                f"slot {slot!r} exists but is a {info.slot_type} slot for plugin "
                f"{info.plugin!r}; walex needs a logical slot for 'pgoutput'. "
                "Choose another slot name, or drop it: "
                f"SELECT pg_drop_replication_slot('{slot}');"
            )
        if info.database != database:
            raise SlotInvalidated(
                f"slot {slot!r} belongs to database {info.database!r}, not {database!r}; "
                "choose another slot name"
            )
        if info.wal_status == "lost":
            raise SlotInvalidated(
                f"slot {slot!r} is invalidated (wal_status = lost): the server removed WAL "
                "it still needed, so changes were lost. Drop it "
                f"(SELECT pg_drop_replication_slot('{slot}');) and start again, "
                "re-reading the tables if you need every row; raise "
                "max_slot_wal_keep_size to keep this from happening again"
            )
    elif not durable:
        pass
    elif not create_slot:
        raise SlotNotFound(
            f"replication slot {slot!r} does not exist and create_slot is off; create it "
            f"(SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');) "
            "or let walex create it"
        )
    if info is None and used_slots >= max_slots:
        raise NoFreeReplicationSlots(
            f"all {max_slots} replication slots are in use; drop unused ones "
            "(see pg_replication_slots) or raise max_replication_slots and restart Postgres"
        )
    return ServerFacts(version_num=version, database=database, slot=info)


# --- operations: doctor, setup, slots ------------------------------------------
#
# What the `walex doctor`, `walex setup` and `walex slots` commands do, as
# functions over a normal connection, so that programs can run the same
# checks (a health endpoint, a deployment step) without the command line.

CheckStatus = Literal["ok", "warn", "fail"]


# The server's rule for slot names (ReplicationSlotValidateName).
#: What Postgres accepts as a replication slot name.
SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")

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


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """A replication slot as `walex slots` and `walex doctor` show it.

    Attributes:
        name: the slot's name.
        plugin: the output plugin (``"pgoutput"``), ``None`` for a physical slot.
        slot_type: ``"logical"`` or ``"physical"``.
        database: the slot's database (``None`` for a physical slot).
        temporary: the slot goes away with its connection.
        active_pid: the server process streaming from it, ``None`` when idle.
        confirmed_flush_lsn: what its consumer confirmed (logical slots).
        restart_lsn: the oldest WAL the slot keeps.
        lag_bytes: WAL written since the confirmed position: how far the
            consumer is behind (``None`` when unknown).
        retained_bytes: WAL the server keeps on disk for the slot.
        wal_status: ``"reserved"``, ``"extended"``, ``"unreserved"`` or
            ``"lost"`` (Postgres 13+; ``None`` before).
        safe_wal_size: bytes that can still be written before the slot is at
            risk of losing WAL (``None`` when ``max_slot_wal_keep_size`` is -1).
    """

    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active_pid: int | None
    confirmed_flush_lsn: LSN | None
    restart_lsn: LSN | None
    lag_bytes: int | None
    retained_bytes: int | None
    wal_status: str | None
    safe_wal_size: int | None

    @property
    def active(self) -> bool:
        """Whether a process streams from the slot now."""
        return self.active_pid is not None


async def list_slots(
    conn: psycopg.AsyncConnection[Any], name: str | None = None
) -> list[SlotStatus]:
    """Every replication slot of the server (or only the one called *name*), by name."""
    version = conn.info.server_version
    wal_status = "wal_status" if version >= 130000 else "NULL::text"
    safe_wal = "safe_wal_size" if version >= 130000 else "NULL::int8"
    # On a standby pg_current_wal_lsn() raises; what it received is the end.
    cur = await conn.execute(
        f"""
        WITH here AS (
          SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                      ELSE pg_current_wal_lsn() END AS lsn
        )
        SELECT slot_name::text, plugin::text, slot_type, database::text, temporary,
               active_pid, confirmed_flush_lsn::text, restart_lsn::text,
               pg_wal_lsn_diff(here.lsn, confirmed_flush_lsn)::int8,
               pg_wal_lsn_diff(here.lsn, restart_lsn)::int8,
               {wal_status}, {safe_wal}
          FROM pg_replication_slots, here
         WHERE %(name)s::text IS NULL OR slot_name = %(name)s::text
         ORDER BY slot_name
        """,
        {"name": name},
    )
    return [
        SlotStatus(
            name=row[0],
            plugin=row[1],
            slot_type=row[2],
            database=row[3],
            temporary=bool(row[4]),
            active_pid=row[5],
            confirmed_flush_lsn=LSN.parse(row[6]) if row[6] else None,
            restart_lsn=LSN.parse(row[7]) if row[7] else None,
            lag_bytes=max(0, row[8]) if row[8] is not None else None,
            retained_bytes=max(0, row[9]) if row[9] is not None else None,
            wal_status=row[10],
            safe_wal_size=row[11],
        )
        for row in await cur.fetchall()
    ]


async def drop_slot(conn: psycopg.AsyncConnection[Any], name: str) -> None:
    """Drop the replication slot *name*, unless a process streams from it.

    Raises:
        SlotNotFound: there is no such slot.
        SlotInUse: a process streams from it; stop that consumer first.
    """
    info = await slot_info(conn, name)
    if info is None:
        raise SlotNotFound(f"there is no replication slot {name!r}; see walex slots")
    if info.active_pid is not None:
        raise SlotInUse(
            f"slot {name!r} is in use by server process {info.active_pid}; stop its "
            "consumer first (or, to cut it off, SELECT pg_terminate_backend"
            f"({info.active_pid});) and drop the slot then",
            info.active_pid,
        )
    try:
        await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    except psycopg.errors.ObjectInUse as exc:
        # Taken between our look and the drop.
        raise SlotInUse(f"slot {name!r} became active meanwhile: {exc}") from exc
    except psycopg.errors.UndefinedObject as exc:
        raise SlotNotFound(f"slot {name!r} went away meanwhile") from exc


# --- setup ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableRef:
    """A table that exists, as the catalog names it."""

    schema: str
    name: str
    oid: int
    replica_identity: str  # "default", "full", "index" or "nothing"
    has_primary_key: bool

    @property
    def qualified(self) -> str:
        """``schema.table``, unquoted, for messages."""
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        """The quoted ``"schema"."table"``."""
        return sql.Identifier(self.schema, self.name)


def split_table_name(name: str) -> tuple[str | None, str]:
    """``"schema.table"`` → ``("schema", "table")``; ``"table"`` → ``(None, "table")``.

    Names are taken as written (case and spaces kept), not as SQL: a name
    with a dot in it can be given in double quotes (``'"my.table"'``).
    """
    name = name.strip()
    if name.startswith('"') and name.endswith('"') and len(name) > 1:
        return None, name[1:-1].replace('""', '"')
    schema, dot, table = name.partition(".")
    if not dot:
        return None, name
    return schema, table


async def find_tables(conn: psycopg.AsyncConnection[Any], names: Sequence[str]) -> list[TableRef]:
    """Look tables up by name (``table`` through the search path, or ``schema.table``).

    Raises:
        ConfigurationError: a table does not exist, or a name is empty.
    """
    found: list[TableRef] = []
    for raw in names:
        schema, table = split_table_name(raw)
        if not table or schema == "":
            raise ConfigurationError(f"{raw!r} is not a table name")
        ident = sql.Identifier(table) if schema is None else sql.Identifier(schema, table)
        # to_regclass resolves a bare name through search_path, as SQL would.
        cur = await conn.execute(
            """
            SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relreplident::text,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p')
            """,
            (ident.as_string(conn),),
        )
        row = await cur.fetchone()
        if row is None:
            raise ConfigurationError(
                f"table {raw!r} does not exist (or is not a table) in database "
                f"{conn.info.dbname!r}; create it first, or check the name and schema"
            )
        found.append(
            TableRef(
                schema=row[1],
                name=row[2],
                oid=int(row[0]),
                replica_identity=REPLICA_IDENTITY.get(row[3], row[3]),
                has_primary_key=bool(row[4]),
            )
        )
    return found


async def publication_tables(
    conn: psycopg.AsyncConnection[Any], publication: str
) -> tuple[bool, set[tuple[str, str]]] | None:
    """Whether *publication* is ``FOR ALL TABLES``, and its tables; ``None`` if missing."""
    cur = await conn.execute(
        "SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)
    )
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s",
        (publication,),
    )
    return bool(row[0]), {(r[0], r[1]) for r in await cur.fetchall()}


async def setup_plan(
    conn: psycopg.AsyncConnection[Any],
    *,
    publication: str,
    tables: Sequence[str],
    replica_identity: Literal["full", "default"] | None = None,
    slot: str | None = None,
) -> list[sql.Composed]:
    """The statements that would set up what is missing, in the order to run them.

    Nothing is changed. An empty list means everything is in place. The
    publication comes before the slot: a slot can only decode a publication
    that existed when the slot's WAL position was written.

    Raises:
        ConfigurationError: a table does not exist, or the slot name is invalid.
    """
    if slot is not None and not SLOT_NAME.match(slot):
        raise ConfigurationError(
            f"slot name {slot!r} is not valid: use 1 to 63 lower-case letters, "
            "digits and underscores"
        )
    refs = await find_tables(conn, tables)
    plan: list[sql.Composed] = []
    existing = await publication_tables(conn, publication)
    pub = sql.Identifier(publication)
    if existing is None:
        if refs:
            plan.append(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    pub, sql.SQL(", ").join(r.identifier for r in refs)
                )
            )
        else:
            plan.append(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(pub))
    else:
        all_tables, members = existing
        missing = [r for r in refs if (r.schema, r.name) not in members]
        if missing and not all_tables:
            plan.append(
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                    pub, sql.SQL(", ").join(r.identifier for r in missing)
                )
            )
    if replica_identity is not None:
        for ref in refs:
            if ref.replica_identity != replica_identity:
                plan.append(
                    sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
                        ref.identifier, sql.SQL(replica_identity.upper())
                    )
                )
    if slot is not None and await slot_info(conn, slot) is None:
        plan.append(
            sql.SQL("SELECT pg_create_logical_replication_slot({}, 'pgoutput')").format(
                sql.Literal(slot)
            )
        )
    return plan


# --- doctor -----------------------------------------------------------------


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
                    "walex setup DSN --publication NAME --tables a,b",
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
        return [
            Check(
                name,
                "fail",
                f"does not exist in database {database!r}",
                f"{fix.as_string(conn)} or walex setup DSN --publication {publication} "
                "--tables a,b",
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
        drop = f"walex slots DSN drop {info.name}" + (
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

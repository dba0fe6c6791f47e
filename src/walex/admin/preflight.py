"""Preflight: is the server ready to stream, checked before any replication connection.

A misconfigured server is reported with what to change instead of as a
protocol error halfway through. It only reads the catalog: it changes
nothing and never opens a replication connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from ..errors import (
    NoFreeReplicationSlots,
    PublicationNotFound,
    ReplicationNotPermitted,
    ServerTooOld,
    SlotInvalidated,
    SlotNotFound,
    WalLevelNotLogical,
)
from .slots import SlotStatus, slot_info

__all__ = ["ServerFacts", "check_server", "preflight"]


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What walex learned about the server before streaming."""

    version_num: int
    database: str
    slot: SlotStatus | None


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

    server = await check_server(conn)
    database, max_slots, used_slots = server.database, server.max_slots, server.used_slots
    cur = await conn.execute(
        "SELECT pubname::text FROM pg_publication WHERE pubname = ANY(%s)", (publications,)
    )
    found = {r[0] for r in await cur.fetchall()}
    missing = [p for p in publications if p not in found]
    if missing:
        names = ", ".join(repr(p) for p in missing)
        create = _sql(conn, "CREATE PUBLICATION {} FOR TABLE my_table;", sql.Identifier(missing[0]))
        raise PublicationNotFound(
            f"publication {names} does not exist in database {database!r}; create it, e.g. "
            f"{create} (or FOR ALL TABLES), or run walex setup"
        )
    info = await slot_info(conn, slot)
    drop = _sql(conn, "SELECT pg_drop_replication_slot({});", sql.Literal(slot))
    if info is not None:
        if info.slot_type != "logical" or info.plugin != "pgoutput":
            raise SlotInvalidated(
                f"slot {slot!r} exists but is a {info.slot_type} slot for plugin "
                f"{info.plugin!r}; walex needs a logical slot for 'pgoutput'. "
                f"Choose another slot name, or drop it: {drop}"
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
                f"({drop}) and start again, "
                "re-reading the tables if you need every row; raise "
                "max_slot_wal_keep_size to keep this from happening again"
            )
    elif not durable:
        pass
    elif not create_slot:
        create = _sql(
            conn, "SELECT pg_create_logical_replication_slot({}, 'pgoutput');", sql.Literal(slot)
        )
        raise SlotNotFound(
            f"replication slot {slot!r} does not exist and create_slot is off; create it "
            f"({create}) or let walex create it"
        )
    if info is None and used_slots >= max_slots:
        raise _no_free_slots(max_slots)
    return ServerFacts(version_num=version, database=database, slot=info)


@dataclass(frozen=True, slots=True)
class _Server:
    database: str
    max_slots: int
    used_slots: int


async def check_server(conn: psycopg.AsyncConnection[Any], *, slot_needed: bool = False) -> _Server:
    """Check what any stream needs of the server: ``wal_level`` and the REPLICATION right.

    ``walex demo`` asks this before it makes anything, with *slot_needed*
    (a free slot for its temporary one).

    Raises:
        WalLevelNotLogical, ReplicationNotPermitted, NoFreeReplicationSlots.
    """
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
        grant = _sql(conn, "ALTER ROLE {} WITH REPLICATION;", sql.Identifier(user))
        raise ReplicationNotPermitted(
            f"the role {user!r} may not stream changes; run {grant} (as a superuser)"
        )
    if slot_needed and used_slots >= max_slots:
        raise _no_free_slots(max_slots)
    return _Server(database, max_slots, used_slots)


def _no_free_slots(max_slots: int) -> NoFreeReplicationSlots:
    return NoFreeReplicationSlots(
        f"all {max_slots} replication slots are in use; drop unused ones "
        "(see pg_replication_slots) or raise max_replication_slots and restart Postgres"
    )


def _sql(
    conn: psycopg.AsyncConnection[Any], template: LiteralString, *names: sql.Composable
) -> str:
    """A statement to show the user, every name quoted by psycopg as the server reads it.

    A name pasted into the text would let one with a quote in it (a
    publication called ``x" FOR ALL TABLES; DROP TABLE t; --``) turn the
    suggestion into other statements when it is run as shown.
    """
    return sql.SQL(template).format(*names).as_string(conn)

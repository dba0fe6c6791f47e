"""Replication slots seen over a normal connection: list them, look one up, drop one.

What ``walex slots`` shows and what preflight, setup and doctor ask about a
slot. It never creates a slot or streams from one: that belongs to the
replication connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..errors import SlotInUse, SlotNotFound
from ..lsn import LSN

__all__ = ["SLOT_NAME", "SlotStatus", "drop_slot", "list_slots", "slot_info"]

# The server's rule for slot names (ReplicationSlotValidateName).
#: What Postgres accepts as a replication slot name.
SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


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
    query = sql.SQL(
        """
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
        """
    ).format(wal_status=sql.SQL(wal_status), safe_wal=sql.SQL(safe_wal))
    cur = await conn.execute(query, {"name": name})
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


async def slot_info(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotStatus | None:
    """The slot named *slot*, or ``None``."""
    found = await list_slots(conn, slot)
    return found[0] if found else None


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
        cut = (
            sql.SQL("SELECT pg_terminate_backend({});")
            .format(sql.Literal(info.active_pid))
            .as_string(conn)
        )
        raise SlotInUse(
            f"slot {name!r} is in use by server process {info.active_pid}; stop its "
            f"consumer first (or, to cut it off, {cut}) and drop the slot then",
            info.active_pid,
        )
    try:
        await conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    except psycopg.errors.ObjectInUse as exc:
        # Taken between our look and the drop.
        raise SlotInUse(f"slot {name!r} became active meanwhile: {exc}") from exc
    except psycopg.errors.UndefinedObject as exc:
        raise SlotNotFound(f"slot {name!r} went away meanwhile") from exc

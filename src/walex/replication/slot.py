"""The replication slot: create it, and wait for it while another process holds it.

Slot *checks* (does it exist, is it invalidated, whose is it) are SQL and
live in :mod:`walex.admin`; this module runs the replication command that
makes a slot and the waits around taking one. It knows nothing of the
stream's state: the stream calls it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from ..admin import slot_info
from ..errors import ServerError, SlotInUse
from . import commands
from .connection import ReplicationConnection

__all__ = ["create", "wait_for_lost_walsender", "wait_for_release"]

logger = logging.getLogger(__name__)

_DUPLICATE_OBJECT = "42710"

SqlConnection = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
"""Returns the SQL connection to look the slot up with (opening it if needed)."""


async def create(conn: ReplicationConnection, slot: str, *, durable: bool, two_phase: bool) -> None:
    """Create the logical slot *slot* for pgoutput (temporary unless *durable*).

    A durable slot that another walex made meanwhile is taken as it is.

    Raises:
        ServerError: the server refused.
    """
    command = commands.create_slot(
        conn,
        slot,
        temporary=not durable,
        two_phase=two_phase,
        server_version=conn.server_version,
    )
    try:
        await conn.command(command)
    except ServerError as exc:
        if exc.sqlstate == _DUPLICATE_OBJECT and durable:
            return  # made meanwhile by another walex: fine, it is ours to share
        raise
    logger.info("created %s slot %r", "durable" if durable else "temporary", slot)


async def wait_for_lost_walsender(sql: SqlConnection, slot: str, pid: int) -> None:
    """Wait until the server process *pid* of our own lost connection lets go of *slot*.

    When walex notices a dead link before the server does (a silent network,
    a middlebox), the server would hold the slot until its
    ``wal_sender_timeout``: after a short wait, walex ends that process, which
    is its own.

    Raises:
        SlotInUse: it still holds the slot after that.
    """
    for attempt in range(150):
        await asyncio.sleep(0.1)
        conn = await sql()
        info = await slot_info(conn, slot)
        if info is None or info.active_pid != pid:
            return
        if attempt == 20:
            logger.warning(
                "slot %r is still held by server process %s of our lost connection; ending it",
                slot,
                pid,
            )
            try:
                await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            except psycopg.Error as exc:
                logger.warning("could not end server process %s (%s); waiting for it", pid, exc)
    raise SlotInUse(
        f"slot {slot!r} is still held by process {pid} of the lost connection; the server "
        "lets it go after wal_sender_timeout",
        pid,
    )


async def wait_for_release(sql: SqlConnection, slot: str, pid: int, every: float) -> None:
    """Wait as a standby until no process holds *slot*, looking every *every* seconds."""
    logger.warning(
        "slot %r is in use by server process %s; waiting as a standby (checking every %gs)",
        slot,
        pid,
        every,
    )
    waited = 0.0
    while True:
        await asyncio.sleep(every)
        waited += every
        info = await slot_info(await sql(), slot)
        if info is None or info.active_pid is None:
            logger.info("slot %r is free; taking over", slot)
            return
        pid = info.active_pid
        if waited >= 60:
            waited = 0.0
            logger.info("still waiting: slot %r is in use by process %s", slot, pid)

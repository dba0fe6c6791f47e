"""``walex.admin.slots``: look slots up and drop them; what it suggests can be run as shown."""

from __future__ import annotations

import pytest

import walex
from tests.fix_pg import Database
from walex.admin import SLOT_NAME, connect_sql, drop_slot, list_slots, slot_info
from walex.errors import SlotInUse, SlotNotFound


def test_slot_name_is_the_servers_rule() -> None:
    assert SLOT_NAME.match("orders_2")
    for bad in ("Orders", "a-b", "", "x" * 64, "a b"):
        assert not SLOT_NAME.match(bad), bad


async def test_list_look_up_and_drop(db: Database) -> None:
    slot = db.unique("idle")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    conn = await connect_sql(db.dsn)
    try:
        info = await slot_info(conn, slot)
        assert info is not None
        assert (info.name, info.plugin, info.slot_type, info.database) == (
            slot,
            "pgoutput",
            "logical",
            db.name,
        )
        assert not info.active
        assert info.lag_bytes is not None
        assert info.lag_bytes >= 0
        assert slot in [s.name for s in await list_slots(conn)]
        await drop_slot(conn, slot)
        assert await slot_info(conn, slot) is None
        with pytest.raises(SlotNotFound):
            await drop_slot(conn, slot)
    finally:
        await conn.close()


async def test_an_active_slot_is_not_dropped_and_the_way_out_is_runnable(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("busy")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    conn = await connect_sql(db.dsn)
    try:
        async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True):
            info = await slot_info(conn, slot)
            assert info is not None
            assert info.active_pid is not None
            with pytest.raises(SlotInUse) as raised:
                await drop_slot(conn, slot)
            assert f"(or, to cut it off, SELECT pg_terminate_backend({info.active_pid});)" in str(
                raised.value
            )
            assert await slot_info(conn, slot) is not None
    finally:
        await conn.close()

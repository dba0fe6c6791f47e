"""``walex.admin.preflight``: the SQL it suggests is quoted, so running it as shown is safe."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from psycopg import sql

from tests.fix_pg import Database
from walex.admin import connect_sql, preflight
from walex.errors import PublicationNotFound, ReplicationNotPermitted, SlotNotFound

# A name that, pasted into SQL between double quotes, ends the statement and drops a table.
HOSTILE = 'x" FOR ALL TABLES; DROP TABLE canary; --'


def _statement(message: str, start: str, end: str) -> str:
    """The statement the message suggests: from *start* to the first *end* after it."""
    first = message.index(start)
    return message[first : message.index(end, first) + len(end)]


def _run_as_shown(db: Database, statement: str) -> None:
    """Run *statement* as a user pasting it would: several statements are run if it holds them."""
    with db.connect() as conn:
        # Without parameters psycopg sends the text as one simple query, as psql does.
        conn.execute(statement)


async def test_publication_not_found_suggests_a_quoted_statement(db: Database) -> None:
    db.execute("CREATE TABLE my_table (id int PRIMARY KEY)")
    db.execute("CREATE TABLE canary (id int)")
    conn = await connect_sql(db.dsn)
    try:
        with pytest.raises(PublicationNotFound) as info:
            await preflight(conn, publications=[HOSTILE], slot="s", durable=False, create_slot=True)
    finally:
        await conn.close()
    message = str(info.value)
    statement = _statement(message, "CREATE PUBLICATION", " FOR TABLE my_table;")
    _run_as_shown(db, statement)
    assert db.fetch("SELECT to_regclass('canary') IS NOT NULL") == [(True,)], statement
    assert db.fetch("SELECT pubname, puballtables FROM pg_publication") == [(HOSTILE, False)]
    assert db.fetch("SELECT tablename FROM pg_publication_tables") == [("my_table",)]
    assert statement == (
        'CREATE PUBLICATION "x"" FOR ALL TABLES; DROP TABLE canary; --" FOR TABLE my_table;'
    )


async def test_replication_not_permitted_suggests_a_quoted_statement(db: Database) -> None:
    role = 'evil" SUPERUSER; DROP TABLE canary; --'
    db.execute("CREATE TABLE canary (id int)")
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        conn = await connect_sql(psycopg.conninfo.make_conninfo(db.dsn, user=role))
        try:
            with pytest.raises(ReplicationNotPermitted) as info:
                await preflight(conn, publications=["p"], slot="s", durable=False, create_slot=True)
        finally:
            await conn.close()
        statement = _statement(str(info.value), "ALTER ROLE", " WITH REPLICATION;")
        _run_as_shown(db, statement)
        assert db.fetch("SELECT to_regclass('canary') IS NOT NULL") == [(True,)], statement
        assert db.fetch(
            "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = %s", [role]
        ) == [(True, False)]
        assert statement == 'ALTER ROLE "evil"" SUPERUSER; DROP TABLE canary; --" WITH REPLICATION;'
    finally:
        # The session may linger a moment after close; DROP ROLE waits for none.
        deadline = time.monotonic() + 5
        while db.fetch("SELECT 1 FROM pg_stat_activity WHERE usename = %s", [role]):
            assert time.monotonic() < deadline, f"the sessions of {role!r} did not end"
            await asyncio.sleep(0.05)
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_slot_names_in_suggestions_are_literals(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE t").format(sql.Identifier(pub)))
    conn = await connect_sql(db.dsn)
    try:
        with pytest.raises(SlotNotFound) as info:
            await preflight(
                conn,
                publications=[pub],
                slot="s'); DROP TABLE t; --",
                durable=True,
                create_slot=False,
            )
    finally:
        await conn.close()
    assert "(SELECT pg_create_logical_replication_slot('s''); DROP TABLE t; --', 'pgoutput');)" in (
        str(info.value)
    )

"""``walex.admin.doctor``: the fixes it shows quote every name, for SQL and for the shell."""

from __future__ import annotations

import shlex

import psycopg

from tests.fix_pg import Database
from walex.admin import Check, connect_sql, diagnose, worst

HOSTILE = 'x" FOR ALL TABLES; DROP TABLE canary; --'


async def test_a_missing_publication_is_quoted_in_sql_and_shell(db: Database) -> None:
    conn = await connect_sql(db.dsn)
    try:
        checks = {c.name: c for c in await diagnose(conn, publication=HOSTILE)}
    finally:
        await conn.close()
    check = checks[f"publication {HOSTILE}"]
    assert check.status == "fail"
    assert check.fix is not None
    sql_part, _, shell_part = check.fix.partition(" or ")
    assert (
        sql_part == 'CREATE PUBLICATION "x"" FOR ALL TABLES; DROP TABLE canary; --" FOR TABLE ...;'
    )
    # The shell gives walex setup the name as it is, in one word.
    words = shlex.split(shell_part)
    assert words[:3] == ["walex", "setup", "DSN"]
    assert words[words.index("--publication") + 1] == HOSTILE
    assert words[-4:] == ["--table", "a", "--table", "b"]


async def test_a_superuser_has_the_replication_right(db: Database) -> None:
    conn = await connect_sql(db.dsn)
    try:
        user = conn.info.user
        checks = {c.name: c for c in await diagnose(conn)}
    finally:
        await conn.close()
    assert checks["replication right"] == Check(
        "replication right", "ok", f"role {user!r} has superuser"
    )
    assert worst(list(checks.values())) in ("ok", "warn")


def test_worst() -> None:
    assert worst([]) == "ok"
    assert worst([Check("a", "ok", ""), Check("b", "warn", "")]) == "warn"
    assert worst([Check("a", "fail", ""), Check("b", "warn", "")]) == "fail"


async def test_a_ready_database_has_no_failure(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute("CREATE PUBLICATION p FOR TABLE t")
    db.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    async with await psycopg.AsyncConnection.connect(db.dsn, autocommit=True) as conn:
        checks = await diagnose(conn, publication="p", slot="not_yet")
    assert [c.name for c in checks if c.status == "fail"] == []
    names = [c.name for c in checks]
    assert names[:5] == [
        "server version",
        "wal_level",
        "max_replication_slots",
        "max_wal_senders",
        "replication right",
    ]
    assert "publication p" in names
    assert "replica identity public.t" in names
    assert "slot not_yet" in names

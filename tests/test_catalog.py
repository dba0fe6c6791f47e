"""walex.catalog: what a table needs is fetched for all published tables at once."""

from __future__ import annotations

from typing import Any

import pytest

import walex
from tests.fix_pg import Database
from tests.streams import collect
from walex.catalog import Catalog


def _count_single_lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = Catalog._primary_key

    async def counting(self: Catalog, conn: Any, oid: int) -> tuple[str, ...]:
        calls.append(oid)
        return await original(self, conn, oid)

    monkeypatch.setattr(Catalog, "_primary_key", counting)
    return calls


async def test_many_tables_are_described_in_bulk(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = [f"t{i}" for i in range(60)]
    for t in tables:
        db.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, k text, v numeric)")
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR ALL TABLES")
    single = _count_single_lookups(monkeypatch)
    async with walex.connect(db.dsn, publication=pub) as stream:
        with db.connect() as conn, conn.transaction():
            for t in tables:
                conn.execute(f"INSERT INTO {t} VALUES (1, 'a', 1.5)")
        events = await collect(stream, len(tables))
        assert {e.table for e in events} == set(tables)
        assert all(e.source is not None and e.source.primary_key == ("id",) for e in events)
        assert all(e.source.columns["v"] == "numeric" for e in events if e.source)
        assert single == []  # no round trip per table

        # Tables made after the stream started: one more bulk lookup for all of them.
        later = [f"n{i}" for i in range(20)]
        for t in later:
            db.execute(f"CREATE TABLE {t} (a int, b int, PRIMARY KEY (b, a))")
        with db.connect() as conn, conn.transaction():
            for t in later:
                conn.execute(f"INSERT INTO {t} VALUES (1, 2)")
        events = await collect(stream, len(later))
        assert [e.source.primary_key for e in events if e.source] == [("b", "a")] * len(later)
        assert single == []

        # A table whose shape changed is looked up again, on its own.
        db.execute("ALTER TABLE t0 ADD COLUMN extra text")
        db.execute("ALTER TABLE t0 DROP CONSTRAINT t0_pkey, ADD PRIMARY KEY (id, k)")
        db.execute("INSERT INTO t0 VALUES (2, 'b', 2, 'x')")
        (event,) = await collect(stream, 1)
        assert event.source is not None
        assert event.source.primary_key == ("id", "k")
        assert "extra" in event.source.columns
        assert len(single) == 1

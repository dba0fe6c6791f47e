"""The C fast path (frame → Event) gives exactly what the Python path gives.

The same changes are read through two slots, once with the fast path and once
without, in text and in binary mode, and every event is compared.
"""

from __future__ import annotations

from typing import Any

import pytest

import walex
import walex.transactions
from tests.fix_pg import Database
from tests.streams import collect

pytestmark = pytest.mark.skipif(
    walex.transactions._run_fast is None, reason="the C speedup is not built"
)

WORKLOAD = [
    "INSERT INTO full_t SELECT g, 'n' || g, g * 1.5, now(), '{\"a\": [1, 2]}',"
    " NULL FROM generate_series(1, 50) g",
    "UPDATE full_t SET name = 'changed', doc = '{\"a\": 12345678901234567890123}' WHERE id <= 10",
    "UPDATE full_t SET id = id + 1000 WHERE id = 11",
    "DELETE FROM full_t WHERE id BETWEEN 20 AND 25",
    "INSERT INTO def_t SELECT g, 'x', 'infinity' FROM generate_series(1, 5) g",
    "UPDATE def_t SET v = 'y' WHERE id = 1",
    "UPDATE def_t SET id = 100 WHERE id = 2",
    "DELETE FROM def_t WHERE id = 3",
    "INSERT INTO toast_t VALUES (1, repeat(md5('a'), 400), 1)",
    "UPDATE toast_t SET n = 2",
    "INSERT INTO full_t (id) VALUES (9999)",
]
COUNT = 50 + 10 + 1 + 6 + 5 + 1 + 1 + 1 + 1 + 1 + 1


def comparable(event: walex.Event) -> tuple[Any, ...]:
    src = event.source
    return (
        event.type,
        src.name if src else None,
        event.new_record,
        event.old_record,
        event.unchanged_toast,
        int(event.lsn),
        type(event.lsn),
        event.seq,
        event.xid,
        event.commit_lsn,
        event.prefix,
        event.truncated,
        event.changes,
    )


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_fast_and_python_paths_agree(
    db: Database, binary: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub = db.unique("pub")
    db.execute(
        "CREATE TABLE full_t (id int PRIMARY KEY, name text, price numeric,"
        " at timestamptz, doc jsonb, nothing text)"
    )
    db.execute("ALTER TABLE full_t REPLICA IDENTITY FULL")
    db.execute("CREATE TABLE def_t (id int PRIMARY KEY, v text, d date)")
    db.execute("CREATE TABLE toast_t (id int PRIMARY KEY, body text, n int)")
    db.execute("ALTER TABLE toast_t ALTER COLUMN body SET STORAGE EXTERNAL")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE full_t, def_t, toast_t")
    slots = [db.unique("fast"), db.unique("slow")]
    for slot in slots:
        db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    for sql in WORKLOAD:
        db.execute(sql)

    async def read(slot: str) -> list[walex.Event]:
        async with walex.connect(
            db.dsn, publication=pub, slot=slot, durable=True, binary=binary
        ) as stream:
            return await collect(stream, COUNT)

    real = walex.transactions._run_fast
    assert real is not None
    hits = 0

    def counting(*args: Any) -> Any:
        nonlocal hits
        taken: int = real(*args)
        hits += taken  # frames: Begin, rows and Commit of plain transactions
        return taken

    monkeypatch.setattr(walex.transactions, "_run_fast", counting)
    fast = await read(slots[0])
    # Most frames take the fast path (all but TOAST, infinity, key-only old rows).
    assert hits >= 60
    monkeypatch.setattr(walex.transactions, "_run_fast", None)
    slow = await read(slots[1])
    assert len(fast) == len(slow) == COUNT
    for a, b in zip(fast, slow, strict=True):
        assert comparable(a) == comparable(b)
    # The workload reaches both paths: infinity dates and TOAST go the slow way.
    assert any(e.unchanged_toast for e in fast)
    assert any(e.new_record and e.new_record.get("d") == "infinity" for e in fast)

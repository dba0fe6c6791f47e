"""pgoutput's protocol options end to end: streaming, two-phase, binary, origin, messages.

The shared clusters run with ``logical_decoding_work_mem=64kB``, so a
transaction of a few hundred 200-byte rows is streamed to walex while it is
still open (``streaming=True``), and ``pg_stat_replication_slots`` shows it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from ipaddress import ip_address, ip_network
from typing import Any

import psycopg
import pytest
from psycopg.types.range import Range

import walex
from tests.fix_pg import Database
from tests.streams import collect, collect_batches
from walex import LSN

_PAD = "repeat('x', 200)"


# -- helpers -----------------------------------------------------------------


def _setup(db: Database, *tables: str) -> str:
    """Tables ``(id int PRIMARY KEY, pad text)`` and a publication for them."""
    pub = db.unique("pub")
    for table in tables:
        db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, pad text)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE {', '.join(tables)}")
    return pub


def _insert(conn: psycopg.Connection[Any], table: str, first: int, last: int) -> None:
    conn.execute(
        f"INSERT INTO {table} SELECT i, {_PAD} FROM generate_series(%s::int, %s::int) AS i",
        (first, last),
    )


def _ids(events: list[walex.Event], table: str | None = None) -> list[int]:
    return [
        e.new_record["id"]
        for e in events
        if e.new_record is not None and (table is None or e.table == table)
    ]


def _wal_insert_lsn(db: Database) -> LSN:
    [(text,)] = db.fetch("SELECT pg_current_wal_insert_lsn()::text")
    return LSN.parse(text)


def _confirmed_flush(db: Database, slot: str) -> LSN:
    [(text,)] = db.fetch(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", [slot]
    )
    return LSN.parse(text)


async def _wait_confirmed(db: Database, slot: str, lsn: int) -> None:
    """Wait (10 s at most) until the server has *lsn* as the slot's confirmed position."""
    try:
        async with asyncio.timeout(10):
            while True:
                if _confirmed_flush(db, slot) >= lsn:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(
            f"slot {slot} did not confirm {LSN(lsn)} within 10 s "
            f"(it is at {_confirmed_flush(db, slot)})"
        ) from None


def _stream_txns(db: Database, slot: str) -> int:
    rows = db.fetch(
        "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = %s", [slot]
    )
    return int(rows[0][0]) if rows else 0


async def _wait_streamed(db: Database, slot: str) -> None:
    """Wait (10 s at most) until the server has streamed a transaction through *slot*."""
    try:
        async with asyncio.timeout(10):
            while True:
                if _stream_txns(db, slot) > 0:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"slot {slot} streamed no transaction (stream_txns = 0)") from None


# -- streaming (protocol 2+) ---------------------------------------------------


async def test_streamed_transaction_with_rolled_back_savepoint(db: Database) -> None:
    pub, slot = _setup(db, "t", "u"), db.unique("slot")
    async with walex.connect(
        db.dsn, publication=pub, slot=slot, durable=True, streaming=True
    ) as stream:
        with db.connect(autocommit=False) as big:
            [(xid,)] = big.execute("SELECT txid_current()").fetchall()
            _insert(big, "t", 1, 1000)
            big.execute("SAVEPOINT s")
            # Table u's first changes happen in the subtransaction that is undone.
            _insert(big, "u", 1, 500)
            _insert(big, "t", 1001, 1500)
            big.execute("ROLLBACK TO SAVEPOINT s")
            # Committed while the big one is open (and already streamed).
            await _wait_streamed(db, slot)
            db.execute(f"INSERT INTO t VALUES (0, {_PAD})")
            small = await collect(stream, 1)
            assert _ids(small) == [0]
            _insert(big, "t", 1501, 2000)
            _insert(big, "u", 1001, 1010)
            big.commit()
        batches = await collect_batches(stream, 1, timeout=30)
        db.execute(f"INSERT INTO t VALUES (-1, {_PAD})")
        after = await collect(stream, 1)
    (batch,) = batches
    events = batch.events
    assert batch.last
    assert batch.end_lsn is not None
    assert _ids(events, "t") == [*range(1, 1001), *range(1501, 2001)]
    assert _ids(events, "u") == list(range(1001, 1011))
    assert [e.table for e in events] == ["t"] * 1500 + ["u"] * 10
    assert [e.seq for e in events] == list(range(1510))
    assert {e.xid for e in events} == {xid}
    assert len({e.commit_lsn for e in events}) == 1
    assert all(e.new_record is not None and e.new_record["pad"] == "x" * 200 for e in events)
    # Commit order: the small transaction committed first, the marker last.
    assert small[0].commit_lsn < events[0].commit_lsn < after[0].commit_lsn
    assert _ids(after) == [-1]
    assert _stream_txns(db, slot) >= 1


async def test_streamed_transaction_that_aborts_is_never_delivered(db: Database) -> None:
    pub, slot = _setup(db, "t"), db.unique("slot")
    async with walex.connect(
        db.dsn, publication=pub, slot=slot, durable=True, streaming=True
    ) as stream:
        with db.connect(autocommit=False) as big:
            _insert(big, "t", 1, 2000)
            await _wait_streamed(db, slot)
            big.rollback()
        db.execute(f"INSERT INTO t VALUES (-1, {_PAD})")
        events = await collect(stream, 1)
        assert _ids(events) == [-1]
        assert len(events) == 1
        # The stream goes on normally.
        db.execute(f"INSERT INTO t VALUES (-2, {_PAD})")
        assert _ids(await collect(stream, 1)) == [-2]


# -- two-phase commit (Postgres 15+) --------------------------------------------


async def test_prepared_transaction_is_delivered_once_at_commit_prepared(db: Database) -> None:
    pub, slot = _setup(db, "t"), db.unique("slot")
    gid = db.unique("gid")
    async with walex.connect(
        db.dsn, publication=pub, slot=slot, durable=True, two_phase=True, status_interval=0.2
    ) as stream:
        db.execute("INSERT INTO t VALUES (1, 'before')")
        [first] = await collect_batches(stream, 1)
        assert first.end_lsn is not None

        with db.connect(autocommit=False) as prep:
            _insert(prep, "t", 10, 12)
            prep.execute("SELECT pg_logical_emit_message(true, 'prep', 'in the prepared one')")
            prep.execute(f"PREPARE TRANSACTION '{gid}'")
        after_prepare = _wal_insert_lsn(db)

        # Later transactions go ahead of the prepared one, which waits for its commit.
        db.execute("INSERT INTO t VALUES (2, 'later')")
        assert _ids(await collect(stream, 1)) == [2]
        db.execute("INSERT INTO t VALUES (3, 'later')")
        [third] = await collect(stream, 1)
        assert _ids([third]) == [3]
        # 1 and 2 are handled: the confirmations reach the server...
        await _wait_confirmed(db, slot, first.end_lsn)
        await asyncio.sleep(1.0)  # five status intervals
        # ...but never past the prepared transaction, which a restart must see again.
        assert _confirmed_flush(db, slot) < after_prepare
        assert stream.confirmed_lsn < after_prepare

        db.execute(f"COMMIT PREPARED '{gid}'")
        [prepared] = await collect_batches(stream, 1)
        db.execute("INSERT INTO t VALUES (4, 'after')")
        [fourth] = await collect_batches(stream, 1)
        # Everything is handled now, so the position moves past the prepare.
        db.execute("INSERT INTO t VALUES (5, 'after')")
        [fifth] = await collect_batches(stream, 1)
        assert fourth.end_lsn is not None
        await _wait_confirmed(db, slot, fourth.end_lsn)

    assert prepared.transaction.gid == gid
    assert _ids(prepared.events) == [10, 11, 12]
    assert [e.type for e in prepared.events] == ["insert"] * 3 + ["message"]
    assert prepared.events[3].content == b"in the prepared one"
    assert prepared.last
    # Delivered at COMMIT PREPARED: after the transactions that committed before it.
    assert prepared.commit_lsn > third.commit_lsn > after_prepare
    assert {e.transaction.gid for e in prepared.events} == {gid}
    # Once: the next batches are the next transactions.
    assert _ids(fourth.events) == [4]
    assert _ids(fifth.events) == [5]
    assert fourth.transaction.gid is None
    assert _confirmed_flush(db, slot) >= after_prepare


async def test_rolled_back_prepared_transaction_is_never_delivered(db: Database) -> None:
    pub = _setup(db, "t")
    gid = db.unique("gid")
    async with walex.connect(db.dsn, publication=pub, two_phase=True) as stream:
        with db.connect(autocommit=False) as prep:
            _insert(prep, "t", 10, 12)
            prep.execute(f"PREPARE TRANSACTION '{gid}'")
        db.execute(f"ROLLBACK PREPARED '{gid}'")
        db.execute("INSERT INTO t VALUES (1, 'marker')")
        events = await collect(stream, 1)
        assert _ids(events) == [1]
        assert len(events) == 1
        assert events[0].transaction.gid is None


async def test_prepared_transaction_survives_a_restart(db: Database) -> None:
    pub, slot = _setup(db, "t"), db.unique("slot")
    gid = db.unique("gid")
    options: dict[str, Any] = {"slot": slot, "durable": True, "two_phase": True}
    async with walex.connect(db.dsn, publication=pub, **options) as stream:
        with db.connect(autocommit=False) as prep:
            _insert(prep, "t", 10, 11)
            prep.execute(f"PREPARE TRANSACTION '{gid}'")
        db.execute("INSERT INTO t VALUES (1, 'later')")
        assert _ids(await collect(stream, 1)) == [1]
    # Closed with the prepared transaction pending; committed while nobody listens.
    db.execute(f"COMMIT PREPARED '{gid}'")
    async with walex.connect(db.dsn, publication=pub, **options) as stream:
        batches = await collect_batches(stream, 1)
        if _ids(batches[0].events) == [1]:  # at least once: a replay is allowed
            batches = await collect_batches(stream, 1)
    (batch,) = batches
    assert batch.transaction.gid == gid
    assert _ids(batch.events) == [10, 11]


async def test_big_prepared_transaction_is_stream_prepared(db: Database) -> None:
    pub, slot = _setup(db, "t"), db.unique("slot")
    gid = db.unique("gid")
    async with walex.connect(
        db.dsn,
        publication=pub,
        slot=slot,
        durable=True,
        streaming=True,
        two_phase=True,
        status_interval=0.2,
    ) as stream:
        with db.connect(autocommit=False) as prep:
            _insert(prep, "t", 1, 2000)
            await _wait_streamed(db, slot)
            prep.execute(f"PREPARE TRANSACTION '{gid}'")
        after_prepare = _wal_insert_lsn(db)
        db.execute(f"INSERT INTO t VALUES (-1, {_PAD})")
        [marker] = await collect_batches(stream, 1)
        assert _ids(marker.events) == [-1]
        db.execute(f"INSERT INTO t VALUES (-2, {_PAD})")
        assert _ids(await collect(stream, 1)) == [-2]
        await asyncio.sleep(1.0)
        assert _confirmed_flush(db, slot) < after_prepare
        db.execute(f"COMMIT PREPARED '{gid}'")
        batches = await collect_batches(stream, 1, timeout=30)
        db.execute(f"INSERT INTO t VALUES (-3, {_PAD})")
        after = await collect(stream, 1)
    (batch,) = batches
    assert batch.transaction.gid == gid
    assert _ids(batch.events) == list(range(1, 2001))
    assert [e.seq for e in batch.events] == list(range(2000))
    assert batch.commit_lsn > marker.commit_lsn
    assert _ids(after) == [-3]


# -- binary -------------------------------------------------------------------------

_TYPES = """
    id int PRIMARY KEY,
    small smallint, big bigint, num numeric(12, 3), real4 real, dbl float8,
    flag boolean, txt text, vc varchar(10), ch char(3), bin bytea,
    day date, clock time, moment timestamp, instant timestamptz, span interval,
    ident uuid, doc jsonb, raw json, ints int[], words text[],
    addr inet, net cidr, period int4range, mood mood, score positive
"""
_ROW = """
    1, -3, 9000000000, 1234.500, 1.5, 2.25,
    true, 'héllo', 'ten chars!', 'ab', '\\x00ff10',
    '2024-02-29', '13:14:15.5', '2024-02-29 13:14:15.123456',
    '2024-02-29 13:14:15+02', '1 day 2 hours 3 seconds',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.5, null]}', '{"b": 1}',
    '{1,NULL,3}', '{"x y",z}',
    '192.168.0.1', '10.0.0.0/8', '[1,5)', 'happy', 7
"""


async def test_binary_values_equal_text_values(db: Database) -> None:
    db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    db.execute("CREATE DOMAIN positive AS int CHECK (VALUE > 0)")
    db.execute(f"CREATE TABLE v ({_TYPES})")
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE v")
    async with (
        walex.connect(db.dsn, publication=pub) as text,
        walex.connect(db.dsn, publication=pub, binary=True) as binary,
    ):
        db.execute(f"INSERT INTO v VALUES ({_ROW})")
        db.execute("INSERT INTO v (id) VALUES (2)")
        from_text = await collect(text, 2)
        from_binary = await collect(binary, 2)
    assert [e.new_record for e in from_binary] == [e.new_record for e in from_text]
    row = from_text[0].new_record
    assert row == {
        "id": 1,
        "small": -3,
        "big": 9000000000,
        "num": Decimal("1234.500"),
        "real4": 1.5,
        "dbl": 2.25,
        "flag": True,
        "txt": "héllo",
        "vc": "ten chars!",
        "ch": "ab ",
        "bin": b"\x00\xff\x10",
        "day": date(2024, 2, 29),
        "clock": dtime(13, 14, 15, 500000),
        "moment": datetime(2024, 2, 29, 13, 14, 15, 123456),
        "instant": datetime(2024, 2, 29, 11, 14, 15, tzinfo=UTC),
        "span": timedelta(days=1, hours=2, seconds=3),
        "ident": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "doc": {"a": [1, 2.5, None]},
        "raw": {"b": 1},
        "ints": [1, None, 3],
        "words": ["x y", "z"],
        "addr": ip_address("192.168.0.1"),
        "net": ip_network("10.0.0.0/8"),
        "period": Range(1, 5, "[)"),
        "mood": "happy",
        "score": 7,
    }
    assert from_text[1].new_record == {"id": 2} | {k: None for k in row if k != "id"}


# -- origin (Postgres 16+) -----------------------------------------------------------


def _origin_changes(db: Database, origin: str) -> None:
    """Row 1 from a session with a replication origin, then row 2 from a plain one."""
    with db.connect() as conn:
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", [origin])
        conn.execute("INSERT INTO t VALUES (1, 'replicated')")
        conn.execute("SELECT pg_replication_origin_session_reset()")
    db.execute("INSERT INTO t VALUES (2, 'local')")


async def test_origin_none_skips_replicated_changes(db: Database) -> None:
    if db.major < 16:
        pytest.skip("the origin option of pgoutput needs Postgres 16")
    pub = _setup(db, "t")
    origin = db.unique("upstream")
    db.execute("SELECT pg_replication_origin_create(%s)", [origin])
    try:
        async with walex.connect(db.dsn, publication=pub, origin="none") as stream:
            _origin_changes(db, origin)
            events = await collect(stream, 1)
        assert _ids(events) == [2]
        assert events[0].transaction.origin is None

        db.execute("DELETE FROM t")
        async with walex.connect(db.dsn, publication=pub, origin="any") as stream:
            _origin_changes(db, origin)
            events = await collect(stream, 2)
        assert _ids(events) == [1, 2]
        assert events[0].transaction.origin == origin
        assert events[1].transaction.origin is None
    finally:
        db.execute("SELECT pg_replication_origin_drop(%s)", [origin])


# -- logical messages ----------------------------------------------------------------


async def test_messages_follow_their_transaction(db: Database) -> None:
    pub = _setup(db, "t")
    async with walex.connect(db.dsn, publication=pub) as stream:
        with db.connect(autocommit=False) as conn:
            conn.execute("SELECT pg_logical_emit_message(true, 'tx', 'undone')")
            conn.execute("SELECT pg_logical_emit_message(false, 'now', 'kept')")
            conn.execute("INSERT INTO t VALUES (1, 'undone')")
            conn.rollback()
        db.execute("SELECT pg_logical_emit_message(true, 'tx', 'committed')")
        events = await collect(stream, 2)
    assert [(e.type, e.prefix, e.content, e.transactional) for e in events] == [
        ("message", "now", b"kept", False),
        ("message", "tx", b"committed", True),
    ]

"""Each flaw of the Elixir WalEx (shared/reference/walex-behaviour.md), shown fixed through the app.

One test per flaw, named after it, against a real Postgres, through
``WalEx`` handlers (not the engine directly), so that the fix holds where
users meet it.
"""

from __future__ import annotations

import asyncio
import math
import re
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from tests.fix_pg import Database
from tests.helpers import confirmed_flush, make_app, until
from walex import Event, WalEx
from walex.errors import HandlerError, SlotLost
from walex.lsn import LSN

ROOT = Path(__file__).resolve().parent.parent


def table(db: Database, ddl: str, name: str = "t", identity: str = "FULL") -> str:
    pub = db.unique("pub")
    db.execute(ddl)
    db.execute(f"ALTER TABLE {name} REPLICA IDENTITY {identity}")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE {name}")
    return pub


async def one_insert(db: Database, pub: str, sql: str, params: Any = None, **kw: Any) -> Event:
    app = make_app(db, pub, **kw)
    got: list[Event] = []
    app.on_insert("*")(got.extend)
    async with app:
        db.execute(sql, params)
        await until(lambda: len(got) >= 1)
    return got[0]


async def test_confirms_only_what_handlers_finished(db: Database) -> None:
    """Flaw: it confirms the server's WAL end on each keepalive, whatever was handled."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY)")
    name = db.unique("app")
    app = make_app(db, pub, name=name, retries=0, status_interval=0.2)
    release = asyncio.Event()
    entered = asyncio.Event()

    @app.on_insert("t")
    async def slow(events: list[Event]) -> None:
        entered.set()
        await release.wait()
        raise RuntimeError("crash before finishing")

    await app.start()
    db.execute("INSERT INTO t VALUES (1)")
    async with asyncio.timeout(15):
        await entered.wait()
    # Keepalives come and go while the handler works; the slot stays before it.
    db.execute("SELECT pg_switch_wal()")
    await asyncio.sleep(1.0)
    slot = app.settings.slot_name
    before = confirmed_flush(db, slot)
    release.set()
    with pytest.raises(HandlerError):
        async with asyncio.timeout(15):
            await app.wait()
    after = confirmed_flush(db, slot)
    again = make_app(db, pub, name=name)
    got: list[Event] = []
    again.on_insert("t")(got.extend)
    async with again:
        await until(lambda: len(got) >= 1)
    assert [(e.new_record or {})["id"] for e in got] == [1]
    assert before <= got[0].commit_lsn
    assert after <= got[0].commit_lsn


async def test_commit_order_not_reverse(db: Database) -> None:
    """Flaw: the changes of a transaction reached handlers newest first."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY)")
    app = make_app(db, pub)
    got: list[int] = []

    @app.on_insert("t")
    async def handler(events: list[Event]) -> None:
        got.extend((e.new_record or {})["id"] for e in events)

    async with app:
        with db.connect(autocommit=False) as a, db.connect(autocommit=False) as b:
            a.execute("INSERT INTO t VALUES (1)")
            b.execute("INSERT INTO t VALUES (10)")
            a.execute("INSERT INTO t VALUES (2)")
            a.execute("INSERT INTO t VALUES (3)")
            b.commit()
            a.commit()
        await until(lambda: len(got) >= 4)
    assert got == [10, 1, 2, 3]


async def test_temporary_slot_gap_is_an_error_not_silence(db: Database) -> None:
    """Flaw: a temporary slot reconnected to a new slot; the gap was silently lost."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY)")
    app = make_app(db, pub, durable_slot=False)
    got: list[Event] = []
    app.on_insert("t")(got.extend)
    await app.start()
    db.execute("INSERT INTO t VALUES (1)")
    await until(lambda: len(got) >= 1)
    db.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
        (app.settings.slot_name,),
    )
    db.execute("INSERT INTO t VALUES (2)")  # made while no slot holds it
    with pytest.raises(SlotLost, match="durable"):
        async with asyncio.timeout(20):
            await app.wait()
    assert not app.running
    # The default is the durable slot, which has no such gap.
    assert WalEx(publication="p").settings.durable_slot is True


async def test_float_arrays_and_underscore_int_types_do_not_crash(db: Database) -> None:
    """Flaw: float arrays holding 1 or NaN, and _interval / _int4range arrays, crashed the cast."""
    pub = table(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, f8 float8[], f4 float4[], iv interval[],"
        " r int4range[], i4 int4[])",
    )
    e = await one_insert(
        db,
        pub,
        "INSERT INTO t VALUES (1, '{1,NaN,1.5,Infinity}', '{1,NaN}', '{\"1 day\",NULL}',"
        " '{\"[1,2)\",empty}', '{1,NULL,3}')",
    )
    rec = e.new_record
    assert rec is not None
    f8 = rec["f8"]
    assert f8[0] == 1.0
    assert isinstance(f8[0], float)
    assert math.isnan(f8[1])
    assert f8[2:] == [1.5, math.inf]
    assert rec["f4"][0] == 1.0
    assert math.isnan(rec["f4"][1])
    assert rec["iv"] == [timedelta(days=1), None]
    assert rec["r"] == [Range(1, 2, "[)"), Range(empty=True)]
    assert rec["i4"] == [1, None, 3]


async def test_no_dropped_columns_ranges_multiranges_jsonpath_xid8(db: Database) -> None:
    """Flaw: types missing from its table (ranges, multiranges, jsonpath, xid8) vanished."""
    pub = table(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, r int8range, dr daterange, mr int4multirange,"
        " jp jsonpath, x xid8, tr tstzrange)",
    )
    e = await one_insert(
        db,
        pub,
        "INSERT INTO t VALUES (1, '[1,10)', '[2024-01-01,2024-02-01)', '{[1,3),[5,7)}',"
        " '$.a[*] ? (@ > 1)', '12345678901', '[2024-01-01 00:00+00,)')",
    )
    rec = e.new_record
    assert rec is not None
    assert set(rec) == {"id", "r", "dr", "mr", "jp", "x", "tr"}
    assert rec["r"] == Range(1, 10, "[)")
    assert rec["dr"] == Range(date(2024, 1, 1), date(2024, 2, 1), "[)")
    assert rec["mr"] == Multirange([Range(1, 3, "[)"), Range(5, 7, "[)")])
    assert rec["jp"] == '$."a"[*]?(@ > 1)'
    assert rec["tr"].lower == datetime(2024, 1, 1, tzinfo=UTC)
    # xid8 has no psycopg loader: its text, exactly as a psycopg SELECT gives it.
    assert rec["x"] == "12345678901"
    with db.connect() as conn:
        cur = conn.execute("SELECT * FROM t")
        names = [c.name for c in cur.description or []]
        assert rec == dict(zip(names, cur.fetchone() or (), strict=True))


async def test_timetz_keeps_offset_and_timestamps_are_datetimes(db: Database) -> None:
    """Flaw: timetz lost its offset; timestamps were left as strings."""
    pub = table(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, tz timetz, ts timestamp, tstz timestamptz,"
        " d date, n numeric)",
    )
    e = await one_insert(
        db,
        pub,
        "INSERT INTO t VALUES (1, '13:45:59.123456+05:30', '2024-05-01 12:00:00.5',"
        " '2024-05-01 12:00:00+02', '2024-05-01', 12.50)",
    )
    rec = e.new_record
    assert rec is not None
    assert rec["tz"] == time(13, 45, 59, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert rec["tz"].utcoffset() == timedelta(hours=5, minutes=30)
    assert rec["ts"] == datetime(2024, 5, 1, 12, 0, 0, 500000)
    assert rec["tstz"] == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert rec["d"] == date(2024, 5, 1)
    assert rec["n"] == Decimal("12.50")
    assert isinstance(e.commit_timestamp, datetime)
    assert e.commit_timestamp.tzinfo is not None


async def test_updates_under_replica_identity_default_kept_by_unwatched_fields(
    db: Database,
) -> None:
    """Flaw: under DEFAULT, updates had no changes, so unwatched_fields dropped every update."""
    pub = table(
        db,
        "CREATE TABLE t (id int PRIMARY KEY, title text, updated_at timestamptz)",
        identity="DEFAULT",
    )
    app = make_app(db, pub)
    got: list[Event] = []
    app.on_update("t", unwatched_fields={"updated_at"})(got.extend)
    async with app:
        db.execute("INSERT INTO t VALUES (1, 'a', now())")
        db.execute("UPDATE t SET title = 'b' WHERE id = 1")
        await until(lambda: len(got) >= 1)
    (e,) = got
    assert e.changes is None  # unknown, not "nothing changed"
    assert (e.new_record or {})["title"] == "b"


async def test_unchanged_toast_is_neither_a_value_nor_a_change(db: Database) -> None:
    """Flaw: an unchanged TOASTed value appeared as a marker in the record and as a change."""
    pub = db.unique("pub")
    db.execute("CREATE TABLE d (id int PRIMARY KEY, n int, body text)")
    db.execute("ALTER TABLE d ALTER COLUMN body SET STORAGE EXTERNAL")  # out of line, uncompressed
    db.execute("CREATE TABLE f (id int PRIMARY KEY, n int, body text)")
    db.execute("ALTER TABLE f ALTER COLUMN body SET STORAGE EXTERNAL")
    db.execute("ALTER TABLE f REPLICA IDENTITY FULL")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE d, f")
    big = "x" * 10000
    app = make_app(db, pub)
    got: list[Event] = []
    app.on_update("*")(got.extend)
    async with app:
        for t in ("d", "f"):
            db.execute(f"INSERT INTO {t} VALUES (1, 1, %s)", (big,))
            db.execute(f"UPDATE {t} SET n = 2")
        await until(lambda: len(got) >= 2)
    default, full = got
    assert default.new_record == {"id": 1, "n": 2}
    assert default.unchanged_toast == {"body"}
    assert default.changes is None
    assert full.new_record == {"id": 1, "n": 2, "body": big}
    assert full.unchanged_toast == frozenset()
    assert full.changes == {"n": (1, 2)}


async def test_truncate_is_handled_by_on_truncate(db: Database) -> None:
    """Flaw: TRUNCATE became nil in event lists, with no truncate handler."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY)")
    app = make_app(db, pub)
    got: list[Event] = []
    everything: list[Event] = []
    app.on_truncate("t")(got.extend)
    app.on_event("t")(everything.extend)
    async with app:
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("TRUNCATE t RESTART IDENTITY")
        await until(lambda: len(got) >= 1 and len(everything) >= 2)
    (e,) = got
    assert (e.type, e.table, e.truncated, e.restart_identity) == (
        "truncate",
        "t",
        ("public.t",),
        True,
    )
    assert None not in everything
    assert [x.type for x in everything] == ["insert", "truncate"]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_messages_streamed_two_phase_and_binary_are_decoded(
    db: Database, binary: bool
) -> None:
    """Flaw: logical messages, streamed and two-phase transactions, binary tuples: not decoded."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY, pad text, n numeric, at timestamptz)")
    options: dict[str, Any] = {"binary": binary, "streaming": True}
    if db.major >= 15:
        options["two_phase"] = True
    app = make_app(db, pub, **options)
    inserts: list[Event] = []
    messages: list[Event] = []
    app.on_insert("t")(inserts.extend)
    app.on_message(prefix="hello")(messages.extend)
    async with app:
        db.execute("SELECT pg_logical_emit_message(false, 'hello', 'non-transactional')")
        # Bigger than logical_decoding_work_mem (64kB on the test clusters): streamed.
        db.execute(
            "INSERT INTO t SELECT g, repeat('x', 200), g * 1.5, '2024-01-01 00:00+00'"
            " FROM generate_series(1, 2000) g"
        )
        if db.major >= 15:
            gid = db.unique("gid")
            with db.connect() as conn:
                conn.execute("BEGIN")
                conn.execute("INSERT INTO t VALUES (-1, 'prepared', 0, now())")
                conn.execute("SELECT pg_logical_emit_message(true, 'hello', 'in 2pc')")
                conn.execute(f"PREPARE TRANSACTION '{gid}'")
                conn.execute(f"COMMIT PREPARED '{gid}'")
        want = 2001 if db.major >= 15 else 2000
        await until(lambda: len(inserts) >= want, within=30)
    assert [(e.new_record or {})["id"] for e in inserts[:3]] == [1, 2, 3]
    assert (inserts[1].new_record or {})["n"] == Decimal("3.0")
    assert (inserts[1].new_record or {})["at"] == datetime(2024, 1, 1, tzinfo=UTC)
    assert messages[0].content == b"non-transactional"
    assert messages[0].transactional is False
    if db.major >= 15:
        assert (inserts[-1].new_record or {})["pad"] == "prepared"
        assert inserts[-1].transaction.gid is not None
        assert [m.content for m in messages[1:]] == [b"in 2pc"]


async def test_bounded_memory_a_big_transaction_arrives_in_batches(db: Database) -> None:
    """Flaw: whole transactions in memory; an unbounded mailbox."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY)")
    app = make_app(db, pub, max_batch_events=100)
    sizes: list[int] = []
    app.on_insert("t")(lambda events: sizes.append(len(events)))
    async with app:
        db.execute("INSERT INTO t SELECT generate_series(1, 1050)")
        await until(lambda: sum(sizes) >= 1050)
    assert sizes == [100] * 10 + [50]


async def test_handler_exception_is_not_silent_and_relation_cache_survives(
    db: Database,
) -> None:
    """Flaw: a handler exception tore the stream down; the relation cache was lost on restart."""
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    name = db.unique("app")
    app = make_app(db, pub, name=name, retries=0)

    @app.on_insert("t")
    async def fails(events: list[Event]) -> None:
        raise RuntimeError("handler bug")

    await app.start()
    db.execute("INSERT INTO t VALUES (1, 'a')")
    # Not a dead stream that looks alive: the app stops and says why.
    with pytest.raises(HandlerError, match="handler bug"):
        async with asyncio.timeout(15):
            await app.wait()
    assert not app.running
    assert isinstance(app.error, HandlerError)
    # After the restart the table is described again: full records, right types.
    db.execute("ALTER TABLE t ADD COLUMN w int DEFAULT 7")
    db.execute("INSERT INTO t VALUES (2, 'b')")
    again = make_app(db, pub, name=name)
    got: list[Event] = []
    again.on_insert("t")(got.extend)
    async with again:
        await until(lambda: len(got) >= 2)
    assert [e.new_record for e in got] == [{"id": 1, "v": "a"}, {"id": 2, "v": "b", "w": 7}]


async def test_names_are_quoted(db: Database) -> None:
    """Flaw: names pasted into SQL. A table and publication with quotes and spaces work."""
    pub = 'Pub "quoted"'
    db.execute('CREATE TABLE "Odd ""T"" x" ("Id" int PRIMARY KEY, "select" text)')
    db.execute('CREATE PUBLICATION "Pub ""quoted""" FOR TABLE "Odd ""T"" x"')
    app = WalEx(
        name=db.unique("app"),
        url=db.dsn,
        publication=pub,
        subscriptions=['"Odd ""T"" x"'],
    )
    got: list[Event] = []
    app.on_insert('"Odd ""T"" x"')(got.extend)
    async with app:
        db.execute("""INSERT INTO "Odd ""T"" x" VALUES (1, 'drop table')""")
        await until(lambda: len(got) >= 1)
    assert got[0].table == 'Odd "T" x'
    assert got[0].new_record == {"Id": 1, "select": "drop table"}


def test_tls_verification_is_libpq_sslmode_never_turned_off() -> None:
    """Flaw: TLS verification off by default. walex sets no sslmode: libpq's rules govern."""
    app = WalEx(hostname="db.example", publication="p")
    assert "sslmode" not in psycopg.conninfo.conninfo_to_dict(app.settings.conninfo)
    strict = WalEx(hostname="db.example", publication="p", sslmode="verify-full")
    assert "sslmode=verify-full" in strict.settings.conninfo
    # Nothing in walex's app layer weakens TLS.
    source = (ROOT / "src" / "walex" / "app.py").read_text() + (
        ROOT / "src" / "walex" / "config.py"
    ).read_text()
    assert not re.search(r"sslmode\s*=\s*['\"](disable|allow|prefer|require)", source)


async def test_start_position_and_several_publications(db: Database) -> None:
    """Flaw: no start position, one publication only."""
    db.execute("CREATE TABLE a (id int PRIMARY KEY)")
    db.execute("CREATE TABLE b (id int PRIMARY KEY)")
    p1, p2 = db.unique("pub"), db.unique("pub")
    db.execute(f"CREATE PUBLICATION {p1} FOR TABLE a")
    db.execute(f"CREATE PUBLICATION {p2} FOR TABLE b")
    name = db.unique("app")
    first = WalEx(name=name, url=db.dsn, publication=[p1, p2])
    async with first:
        pass  # creates the slot
    db.execute("INSERT INTO a VALUES (1)")
    [(skip_to,)] = db.fetch("SELECT pg_current_wal_lsn()::text")
    db.execute("INSERT INTO a VALUES (2)")
    db.execute("INSERT INTO b VALUES (3)")
    app = WalEx(name=name, url=db.dsn, publication=[p1, p2], start_lsn=skip_to)
    got: list[Event] = []
    app.on_insert("*")(got.extend)
    async with app:
        await until(lambda: len(got) >= 2)
    assert [(e.table, (e.new_record or {})["id"]) for e in got] == [("a", 2), ("b", 3)]
    assert got[0].commit_lsn > LSN.parse(skip_to)


async def test_metrics_and_health_hooks(db: Database) -> None:
    """Flaw: no metrics, no health check (backfill is not the app's: not here).

    The app tells observers about every batch and every handler call (the
    metrics module plugs in there) and exposes ``running`` and ``error``
    for a health check.
    """
    pub = table(db, "CREATE TABLE t (id int PRIMARY KEY)")
    batches: list[int] = []
    handler_calls: list[tuple[str, str, BaseException | None]] = []

    class Metrics:
        def on_batch(self, batch: Any, seconds: float) -> None:
            batches.append(len(batch))

        def on_handler(
            self, name: str, table: str, kind: str, seconds: float, error: BaseException | None
        ) -> None:
            handler_calls.append((table, kind, error))

    app = make_app(db, pub, observers=[Metrics()])
    app.on_insert("t")(lambda events: None)
    assert not app.running
    async with app:
        assert app.running
        db.execute("INSERT INTO t VALUES (1), (2)")
        await until(lambda: len(batches) >= 1)
    assert not app.running
    assert app.error is None
    assert batches == [2]
    assert handler_calls == [("public.t", "insert", None)]

"""walex.connect end to end against a real Postgres: the basics."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

import walex
from tests.fix_pg import Database
from tests.fix_services import TcpProxy
from tests.streams import collect, collect_batches
from walex.errors import SlotLost
from walex.metrics import Metrics


async def test_insert_update_delete_truncate_message(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute("CREATE TABLE acct (id int PRIMARY KEY, name text, balance numeric)")
    db.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE acct")
    async with walex.connect(db.dsn, publication=pub, slot=slot) as stream:
        with db.connect() as conn:
            conn.execute("INSERT INTO acct VALUES (1, 'ann', 10.5)")
            with conn.transaction():
                conn.execute("UPDATE acct SET balance = 11 WHERE id = 1")
                conn.execute("SELECT pg_logical_emit_message(true, 'audit', 'paid')")
                conn.execute("DELETE FROM acct WHERE id = 1")
            conn.execute("TRUNCATE acct RESTART IDENTITY")
            conn.execute("SELECT pg_logical_emit_message(false, 'ping', '\\x01'::bytea)")
        events = await collect(stream, 6)
    ins, upd, msg, dele, trunc, ping = events
    assert (ins.type, ins.schema, ins.table) == ("insert", "public", "acct")
    assert ins.new_record == {"id": 1, "name": "ann", "balance": Decimal("10.5")}
    assert ins.old_record is None
    assert ins.changes is None
    assert upd.type == "update"
    assert upd.old_record == {"id": 1, "name": "ann", "balance": Decimal("10.5")}
    assert upd.new_record == {"id": 1, "name": "ann", "balance": Decimal("11")}
    assert upd.changes == {"balance": (Decimal("10.5"), Decimal("11"))}
    assert (msg.type, msg.prefix, msg.content, msg.transactional) == (
        "message",
        "audit",
        b"paid",
        True,
    )
    assert dele.type == "delete"
    assert dele.old_record == upd.new_record
    assert dele.new_record is None
    # One transaction: same commit LSN and xid, seq in statement order.
    assert upd.commit_lsn == msg.commit_lsn == dele.commit_lsn
    assert [upd.seq, msg.seq, dele.seq] == [0, 1, 2]
    assert upd.id == f"{upd.commit_lsn}:0"
    assert dele.id == f"{upd.commit_lsn}:2"
    assert trunc.type == "truncate"
    assert trunc.truncated == ("public.acct",)
    assert trunc.restart_identity
    assert not trunc.cascade
    assert (ping.type, ping.prefix, ping.content, ping.transactional) == (
        "message",
        "ping",
        b"\x01",
        False,
    )
    # Commit order.
    assert ins.commit_lsn < upd.commit_lsn < trunc.commit_lsn < ping.commit_lsn
    now = datetime.now(UTC)
    assert ins.commit_timestamp.tzinfo is not None
    assert now - timedelta(minutes=1) < ins.commit_timestamp <= now


async def test_source_describes_the_table(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE SCHEMA app")
    db.execute(
        "CREATE TABLE app.line (order_id int, line_no int, sku varchar(20), qty int,"
        " PRIMARY KEY (order_id, line_no))"
    )
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE app.line")
    async with walex.connect(db.dsn, publication=pub) as stream:
        db.execute("INSERT INTO app.line VALUES (7, 1, 'A-1', 2)")
        (event,) = await collect(stream, 1)
    src = event.source
    assert src is not None
    assert (src.database, src.schema, src.table, src.name) == (
        db.name,
        "app",
        "line",
        "app.line",
    )
    assert dict(src.columns) == {
        "order_id": "integer",
        "line_no": "integer",
        "sku": "character varying(20)",
        "qty": "integer",
    }
    assert src.primary_key == ("order_id", "line_no")
    assert src.replica_identity == "default"
    assert src.identity_columns == ("order_id", "line_no")


async def test_commit_order_across_interleaved_transactions(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, who text)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub) as stream:
        with db.connect(autocommit=False) as a, db.connect(autocommit=False) as b:
            a.execute("INSERT INTO t VALUES (1, 'a')")
            b.execute("INSERT INTO t VALUES (2, 'b')")
            a.execute("INSERT INTO t VALUES (3, 'a')")
            b.commit()  # b commits first, so it comes first
            a.commit()
        events = await collect(stream, 3)
    assert [(e.new_record or {})["id"] for e in events] == [2, 1, 3]
    assert events[0].xid != events[1].xid == events[2].xid


async def test_large_transaction_arrives_in_bounded_batches(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub, max_batch_events=100) as stream:
        db.execute("INSERT INTO t SELECT generate_series(1, 1050)")
        batches = await collect_batches(stream, 11)
    assert [len(b) for b in batches] == [100] * 10 + [50]
    assert [b.last for b in batches] == [False] * 10 + [True]
    assert all(b.end_lsn is None for b in batches[:-1])
    assert batches[-1].end_lsn is not None
    assert batches[-1].end_lsn > batches[-1].commit_lsn
    ids = [e.new_record["id"] for b in batches for e in b.events if e.new_record]
    assert ids == list(range(1, 1051))
    assert [e.seq for b in batches for e in b.events] == list(range(1050))


async def test_several_publications(db: Database) -> None:
    p1, p2 = db.unique("pub"), db.unique("pub")
    db.execute("CREATE TABLE a (id int PRIMARY KEY)")
    db.execute("CREATE TABLE b (id int PRIMARY KEY)")
    db.execute("CREATE TABLE c (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {p1} FOR TABLE a")
    db.execute(f"CREATE PUBLICATION {p2} FOR TABLE b")
    async with walex.connect(db.dsn, publication=[p1, p2]) as stream:
        db.execute("INSERT INTO c VALUES (1)")
        db.execute("INSERT INTO a VALUES (1)")
        db.execute("INSERT INTO b VALUES (2)")
        events = await collect(stream, 2)
    assert [e.table for e in events] == ["a", "b"]


async def test_quoted_names(db: Database) -> None:
    pub, slot = 'My "Pub"', db.unique("slot")
    db.execute('CREATE TABLE "Odd Table" ("Id" int PRIMARY KEY, "select" text)')
    db.execute('CREATE PUBLICATION "My ""Pub""" FOR TABLE "Odd Table"')
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        db.execute("""INSERT INTO "Odd Table" VALUES (1, 'x')""")
        (event,) = await collect(stream, 1)
    assert event.table == "Odd Table"
    assert event.new_record == {"Id": 1, "select": "x"}


async def test_schema_changes_show_in_next_events(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b int)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub) as stream:
        db.execute("INSERT INTO t VALUES (1, 'x', 1)")
        db.execute("ALTER TABLE t ADD COLUMN c jsonb DEFAULT '{}'")
        db.execute("INSERT INTO t VALUES (2, 'y', 2, '[1]')")
        db.execute("ALTER TABLE t DROP COLUMN a")
        db.execute("INSERT INTO t VALUES (3, 3)")
        db.execute("ALTER TABLE t RENAME COLUMN b TO bee")
        db.execute("INSERT INTO t VALUES (4, 4)")
        db.execute("ALTER TABLE t ALTER COLUMN bee TYPE text")
        db.execute("INSERT INTO t VALUES (5, 'five')")
        events = await collect(stream, 5)
    records = [e.new_record for e in events]
    assert records == [
        {"id": 1, "a": "x", "b": 1},
        {"id": 2, "a": "y", "b": 2, "c": [1]},
        {"id": 3, "b": 3, "c": {}},
        {"id": 4, "bee": 4, "c": {}},
        {"id": 5, "bee": "five", "c": {}},
    ]
    assert events[-1].source is not None
    assert events[-1].source.columns["bee"] == "text"


async def test_events_are_immutable_and_hashable_ids(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub) as stream:
        db.execute("INSERT INTO t VALUES (1), (2)")
        events = await collect(stream, 2)
    with pytest.raises(AttributeError):
        events[0].type = "delete"  # type: ignore[misc]
    assert len({e.id for e in events}) == 2


async def test_iterating_without_async_with_opens_the_stream(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    stream = walex.connect(db.dsn, publication=pub)
    try:
        await stream.open()
        db.execute("INSERT INTO t VALUES (1)")
        (event,) = await collect(stream, 1)
        assert event.new_record == {"id": 1}
    finally:
        await stream.aclose()
    assert not stream.connected
    await asyncio.sleep(0)


async def test_large_rows_bound_batches_by_bytes(db: Database) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub, max_batch_bytes=1_000_000) as stream:
        # 20 rows of 300 kB each (random text: it stays that size on the wire).
        db.execute(
            "INSERT INTO t SELECT g, (SELECT string_agg(md5(random()::text), '')"
            " FROM generate_series(1, 9375) WHERE g > 0) FROM generate_series(1, 20) g"
        )
        batches: list[walex.Batch] = []
        async with asyncio.timeout(30):
            async for batch in stream:
                batches.append(batch)
                if batch.last:
                    break
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 20
    # Cut once a batch holds 1 MB: four rows of 300 kB, never more.
    assert max(sizes) == 4, sizes
    assert all(len(e.new_record["body"]) == 300_000 for b in batches for e in b.events)  # type: ignore[index]


# -- dead links -----------------------------------------------------------------


def _through(db: Database, proxy: TcpProxy) -> str:
    """The database's connection string, through *proxy*."""
    return f"host=127.0.0.1 port={proxy.port} user=postgres dbname={db.name}"


async def test_a_silent_link_is_noticed_and_nothing_is_lost(db: Database) -> None:
    """No FIN, no RST: the stream hears nothing; receive_timeout ends the wait."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    metrics = Metrics(registry=CollectorRegistry())
    unhealthy: list[list[str]] = []
    with TcpProxy("127.0.0.1", db.server.port) as proxy:
        stream = walex.connect(
            _through(db, proxy),
            publication=pub,
            slot=slot,
            durable=True,
            receive_timeout=3,
            connect_timeout=2,
        )
        async with stream:
            metrics.track_stream(stream)
            db.execute("INSERT INTO t VALUES (1)")
            assert [e.new_record for e in await collect(stream, 1)] == [{"id": 1}]
            proxy.black_hole()
            db.execute("INSERT INTO t VALUES (2), (3)")

            async def watch() -> None:
                while True:
                    healthy, problems = metrics.health()
                    if not healthy:
                        unhealthy.append(problems)
                    await asyncio.sleep(0.2)

            watcher = asyncio.ensure_future(watch())
            asyncio.get_running_loop().call_later(6, proxy.heal)
            try:
                events = await collect(stream, 2, timeout=45)
            finally:
                watcher.cancel()
            assert [e.new_record for e in events] == [{"id": 2}, {"id": 3}]
            assert stream.reconnects >= 1
    # While the link was dead and being re-made, the health check said so.
    assert any("not connected" in " ".join(p) for p in unhealthy)


@pytest.mark.parametrize("allow_gap", [False, True])
async def test_a_temporary_slot_lost_to_a_silent_link(db: Database, allow_gap: bool) -> None:
    """walex notices the cut before the server: the old walsender still holds the
    temporary slot, then the slot goes with it. A gap: SlotLost, or a new slot."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    with TcpProxy("127.0.0.1", db.server.port) as proxy:
        stream = walex.connect(
            _through(db, proxy),
            publication=pub,
            receive_timeout=3,
            connect_timeout=2,
            allow_gap=allow_gap,
        )
        async with stream:
            db.execute("INSERT INTO t VALUES (1)")
            await collect(stream, 1)
            proxy.black_hole()
            asyncio.get_running_loop().call_later(5, proxy.heal)
            if not allow_gap:
                with pytest.raises(SlotLost, match="went away with its connection"):
                    await collect(stream, 1, timeout=45)
                return

            # Going on from now: what is committed once the new slot exists arrives.
            async def insert_when_back() -> None:
                while not (stream.connected and stream.reconnects):  # noqa: ASYNC110 - polls the stream's state
                    await asyncio.sleep(0.2)
                db.execute("INSERT INTO t VALUES (2)")

            inserter = asyncio.ensure_future(insert_when_back())
            events = await collect(stream, 1, timeout=45)
            await inserter
            assert [e.new_record for e in events] == [{"id": 2}]

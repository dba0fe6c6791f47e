"""The delivery guarantee: at least once, in commit order, nothing lost.

These tests break things on purpose: a loop body that raises, a consumer
killed with SIGKILL at random moments, Postgres restarted mid-stream, a
replication connection terminated by the server.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import walex
from tests.fix_pg import Database
from tests.streams import collect, collect_batches
from walex.errors import SlotLost
from walex.lsn import LSN

ROOT = Path(__file__).resolve().parent.parent


def confirmed_flush(db: Database, slot: str) -> LSN:
    rows = db.fetch(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return LSN.parse(rows[0][0])


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def make_table(db: Database) -> tuple[str, str]:
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    return pub, slot


async def test_raising_loop_body_confirms_nothing_past_it(db: Database) -> None:
    pub, slot = make_table(db)
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True):
        pass  # creates the slot
    for i in range(1, 4):
        db.execute("INSERT INTO t VALUES (%s, 'x')", (i,))

    seen: list[int] = []

    async def consume() -> None:
        async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
            async with asyncio.timeout(20):
                async for batch in stream:
                    event = batch.events[0]
                    seen.append(event.new_record["id"])  # type: ignore[index]
                    if event.new_record["id"] == 2:  # type: ignore[index]
                        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await consume()
    assert seen == [1, 2]
    first_end = LSN(0)
    # Only the first transaction was handled; the slot says so.
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        batches = await collect_batches(stream, 2)
        first_end = batches[0].commit_lsn
    assert [b.events[0].new_record["id"] for b in batches] == [2, 3]  # type: ignore[index]
    assert confirmed_flush(db, slot) >= first_end


async def test_clean_exit_confirms_what_was_handled(db: Database) -> None:
    pub, slot = make_table(db)
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        db.execute("INSERT INTO t VALUES (1, 'a')")
        db.execute("INSERT INTO t VALUES (2, 'b')")
        batches = await collect_batches(stream, 2)
    end = batches[-1].end_lsn
    assert end is not None
    assert confirmed_flush(db, slot) >= end
    db.execute("INSERT INTO t VALUES (3, 'c')")
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        events = await collect(stream, 1)
    assert [e.new_record for e in events] == [{"id": 3, "v": "c"}]


async def test_partly_handled_transaction_is_delivered_again(db: Database) -> None:
    pub, slot = make_table(db)
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True):
        pass
    db.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 30) g")

    async def crash_midway() -> None:
        async with walex.connect(
            db.dsn, publication=pub, slot=slot, durable=True, max_batch_events=10
        ) as stream:
            await collect_batches(stream, 2)  # two of three batches, the first handled
            raise RuntimeError("crash in the middle of a transaction")

    with pytest.raises(RuntimeError, match="crash"):
        await crash_midway()
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        events = await collect(stream, 30)
    assert [e.new_record["id"] for e in events] == list(range(1, 31))  # type: ignore[index]


async def test_idle_slot_follows_wal_end(db: Database) -> None:
    """Writes to a table outside the publication must not hold WAL."""
    pub, slot = make_table(db)
    db.execute("CREATE TABLE other (id int, pad text)")
    async with walex.connect(
        db.dsn, publication=pub, slot=slot, durable=True, status_interval=0.5
    ) as stream:
        reader = asyncio.ensure_future(collect(stream, 1, timeout=60))
        await asyncio.sleep(0.3)
        start = confirmed_flush(db, slot)
        # About 40 MB of WAL the publication does not see.
        db.execute("INSERT INTO other SELECT g, repeat('p', 400) FROM generate_series(1, 80000) g")
        target = LSN.parse(db.fetch("SELECT pg_current_wal_lsn()::text")[0][0])
        assert target - start > 30_000_000
        await asyncio.to_thread(
            wait_until, lambda: confirmed_flush(db, slot) >= target, 30, "the slot to advance"
        )
        db.execute("INSERT INTO t VALUES (1, 'done')")
        (event,) = await reader
    assert event.new_record == {"id": 1, "v": "done"}


async def test_status_updates_are_not_sent_per_message(db: Database) -> None:
    pub, slot = make_table(db)
    async with walex.connect(db.dsn, publication=pub, slot=slot) as stream:
        with db.connect() as conn:
            for i in range(2000):
                conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
        events = await collect(stream, 2000, timeout=60)
        sent = stream.status_updates
    assert len(events) == 2000
    assert sent < 100, f"{sent} status updates for 2000 transactions"


async def test_terminated_connection_reconnects_and_resumes(db: Database) -> None:
    pub, slot = make_table(db)
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        db.execute("INSERT INTO t VALUES (1, 'before')")
        first = await collect(stream, 1)
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )
        db.execute("INSERT INTO t VALUES (2, 'during')")
        rest = await collect(stream, 1, timeout=30)
        assert stream.reconnects == 1
    assert [e.new_record["id"] for e in first + rest] == [1, 2]  # type: ignore[index]


async def test_temporary_slot_refuses_a_gap(db: Database) -> None:
    pub, _ = make_table(db)
    async with walex.connect(db.dsn, publication=pub) as stream:
        db.execute("INSERT INTO t VALUES (1, 'x')")
        await collect(stream, 1)
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (stream.slot,),
        )
        with pytest.raises(SlotLost, match="durable"):
            await collect(stream, 1, timeout=30)


async def test_temporary_slot_goes_on_when_gap_allowed(db: Database) -> None:
    pub, _ = make_table(db)
    async with walex.connect(db.dsn, publication=pub, allow_gap=True) as stream:
        db.execute("INSERT INTO t VALUES (1, 'x')")
        await collect(stream, 1)
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (stream.slot,),
        )
        task = asyncio.ensure_future(collect(stream, 1, timeout=30))
        # Wait for the new temporary slot, then write: this change must arrive.
        await asyncio.to_thread(
            wait_until,
            lambda: (
                db.fetch(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s AND active",
                    (stream.slot,),
                )[0][0]
                == 1
                and stream.reconnects == 1
            ),
            20,
            "the new temporary slot",
        )
        db.execute("INSERT INTO t VALUES (2, 'after')")
        (event,) = await task
    assert event.new_record == {"id": 2, "v": "after"}


@pytest.mark.slow
async def test_postgres_restart_mid_stream_loses_nothing(db: Database) -> None:
    pub, slot = make_table(db)
    received: list[int] = []

    def restart_then_write() -> None:
        # A fast shutdown waits for walex to confirm what was sent, so the
        # consumer keeps reading while the server restarts.
        db.server.restart()
        db.execute("INSERT INTO t SELECT g, 'c' FROM generate_series(201, 300) g")

    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        db.execute("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g")
        received += [e.new_record["id"] for e in await collect(stream, 100)]  # type: ignore[index]
        db.execute("INSERT INTO t SELECT g, 'b' FROM generate_series(101, 200) g")
        restarted = asyncio.ensure_future(asyncio.to_thread(restart_then_write))
        async with asyncio.timeout(90):
            async for batch in stream:
                received += [e.new_record["id"] for e in batch.events]  # type: ignore[index]
                if 300 in received:
                    break
        await restarted
        assert stream.reconnects >= 1
    assert sorted(set(received)) == list(range(1, 301))
    # Anything seen twice was not yet confirmed when the server went down.
    assert len(received) - len(set(received)) <= 100


def _writer(dsn: str, stop: threading.Event, committed: list[int]) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        n = 0
        while not stop.is_set():
            size = random.choice([1, 1, 1, 5, 40])
            ids = list(range(n + 1, n + size + 1))
            with conn.transaction():
                conn.execute("INSERT INTO t SELECT g, 'w' FROM unnest(%s::int[]) g", (ids,))
            committed.extend(ids)
            n += size
            time.sleep(0.002)


def _read_log(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:  # a line cut by the kill is not a handled event
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["iterate", "pipelined"])
def test_kill_9_at_random_moments_loses_nothing(db: Database, tmp_path: Path, mode: str) -> None:
    """Also with several batches in flight (pipelined delivery): nothing lost,
    duplicates only from transactions that were not confirmed."""
    pub, slot = make_table(db)
    log = tmp_path / "handled.log"
    cmd = [sys.executable, "-m", "tests.consumer_proc", db.dsn, pub, slot, str(log), "7", mode]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The first run creates the slot; from then on every commit is kept for us.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    stop = threading.Event()
    committed: list[int] = []
    writer = threading.Thread(target=_writer, args=(db.dsn, stop, committed))
    writer.start()
    rng = random.Random(20261126)
    confirmed_at_kill: list[tuple[int, LSN]] = []
    try:
        for _round in range(20):
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()
            # What the slot holds as confirmed at the moment of the kill.
            confirmed_at_kill.append((len(_read_log(log)), confirmed_flush(db, slot)))
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        stop.set()
        writer.join(timeout=30)
        expected = set(committed)
        wait_until(lambda: expected <= {r[2] for r in _read_log(log)}, 60, "every row")
    finally:
        stop.set()
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    handled = _read_log(log)
    ids = [r[2] for r in handled]
    assert set(ids) >= set(committed), "a committed row was never handled"
    # A duplicate must come from a transaction that was not confirmed when
    # its consumer was killed: its commit LSN is at or past that position.
    first_seen: dict[tuple[int, int], int] = {}
    for index, (commit, seq, _id) in enumerate(handled):
        key = (commit, seq)
        if key in first_seen:
            # Find the kill that came between the two deliveries.
            kill_confirmed = max(
                (lsn for count, lsn in confirmed_at_kill if first_seen[key] < count <= index),
                default=None,
            )
            assert kill_confirmed is not None, f"{key} delivered twice within one run"
            assert commit >= kill_confirmed, (
                f"transaction {LSN(commit)} was confirmed ({kill_confirmed}) yet delivered again"
            )
        else:
            first_seen[key] = index
    # Within each transaction, events arrive in statement order.
    assert len(handled) >= len(committed)


async def test_heartbeats_travel_the_stream_and_are_not_delivered(db: Database) -> None:
    """A heartbeat goes into the WAL and comes back through the slot: proof
    that the whole path works even when no published table changes."""
    pub, slot = make_table(db)
    async with walex.connect(
        db.dsn,
        publication=pub,
        slot=slot,
        durable=True,
        heartbeat_interval=0.2,
        status_interval=0.2,
    ) as stream:
        reader = asyncio.ensure_future(collect(stream, 1, timeout=60))
        await asyncio.to_thread(
            wait_until, lambda: stream.heartbeats_received >= 3, 20, "three heartbeats"
        )
        assert stream.heartbeats_sent >= stream.heartbeats_received
        last = stream.last_heartbeat_lsn
        assert last is not None
        await asyncio.to_thread(
            wait_until, lambda: confirmed_flush(db, slot) >= last, 20, "the slot to pass it"
        )
        # Heartbeats are walex's own: the loop never sees them.
        db.execute("INSERT INTO t VALUES (1, 'real')")
        (event,) = await reader
    assert event.type == "insert"
    assert event.new_record == {"id": 1, "v": "real"}


async def test_lost_catalog_connection_is_reopened(db: Database) -> None:
    pub, _ = make_table(db)
    async with walex.connect(db.dsn, publication=pub) as stream:
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'walex-catalog' AND datname = current_database()"
        )
        db.execute("INSERT INTO t VALUES (1, 'after')")
        (event,) = await collect(stream, 1)
    assert event.new_record == {"id": 1, "v": "after"}


async def test_cancelling_a_read_loses_nothing(db: Database) -> None:
    """Cancel __anext__ while it looks up a new table in the catalog."""
    pub, slot = make_table(db)
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as stream:
        original = stream._describe
        entered = asyncio.Event()

        async def slow_relation(msg):  # type: ignore[no-untyped-def]
            entered.set()
            await asyncio.sleep(30)
            await original(msg)

        stream._describe = slow_relation  # type: ignore[method-assign]
        db.execute("INSERT INTO t VALUES (1, 'a')")
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.wait_for(entered.wait(), 20)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        stream._describe = original  # type: ignore[method-assign]
        (event,) = await collect(stream, 1)
    assert event.new_record == {"id": 1, "v": "a"}

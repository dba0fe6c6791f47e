"""Engine benchmark: how fast walex drains a replication slot, and in how much memory.

Runs a throw-away Postgres (walex.embedded), writes a backlog of changes that
several logical slots (plugin pgoutput) see alike, then drains those slots in
turn with ``pg_recvlogical`` (the reference: the server's decoding plus a C
client that throws the bytes away), with walex (every value turned into a
Python object) and with a bare reader (psycopg's ``PGconn``, frames read and
thrown away: the server's own pace), each in its own process. Then it drains
one very large transaction to show that walex's memory does not grow with
transaction size.

Usage::

    python bench/drain.py                  # PG 15, 3 rounds, then the big-transaction test
    python bench/drain.py --pg 16
    python bench/drain.py --unix           # every client over the Unix socket, not TCP
    python bench/drain.py --rows 50000 --rounds 1 --no-big    # a quick look
    python bench/drain.py --profile        # one walex drain in-process under cProfile

See bench/README.md for how to read the output. A timing is not a test: this
prints figures and exits 0 whether or not the targets are met (non-zero only
when something broke, such as a drain that did not see every change).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

import walex
from walex.embedded import EmbeddedPostgres, PostgresBinaries, find_binaries

PUBLICATION = "bench"
BIG_PUBLICATION = "bench_big"
TXN_INSERTS = 1000  # per backlog transaction: 2 x 500 inserts, 2 x 100 updates, 2 x 50 deletes
TXN_CHANGES = 1300
TARGET_RATIO = 2.0  # walex changes/s over pg_recvlogical changes/s
TARGET_RSS_MB = 150.0
FLAT_SLACK_MB = 10.0  # "flat": the 1M-row RSS at most this (or 10 %) above the small one
DRAIN_TIMEOUT = 300.0

# Server settings on top of walex.embedded.DEFAULT_SETTINGS (which already has
# fsync=off, full_page_writes=off, synchronous_commit=on). The embedded
# default logical_decoding_work_mem is 64kB (for the tests); the server's own
# default, 64MB, is set back so that the backlog's 1,300-change transactions
# are decoded in memory and only the big transaction spills.
SERVER_SETTINGS = {
    "logical_decoding_work_mem": "64MB",
    "shared_buffers": "256MB",
    "max_wal_size": "8GB",  # no checkpoint in the middle of a drain
    "checkpoint_timeout": "1h",
    "autovacuum": "off",  # nothing else running on a 2-core machine
}

COLUMNS = """
    id bigint PRIMARY KEY,
    name text NOT NULL,
    qty integer NOT NULL,
    price numeric(12, 2) NOT NULL,
    active boolean NOT NULL,
    created_at timestamptz NOT NULL,
    attrs jsonb NOT NULL,
    ref uuid NOT NULL
"""

# One row per id; about 155 bytes (pg_column_size of the row, printed).
ROW_SELECT = """
    SELECT i,
           'c' || i || '-' || substr(md5(i::text), 1, 4),
           (i %% 1000)::int,
           round((i %% 100000) / 7.0, 2),
           i %% 3 <> 0,
           timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second',
           jsonb_build_object('color', (ARRAY['red', 'green', 'blue'])[i %% 3 + 1],
                              'size', i %% 50, 'tags', jsonb_build_array('a', 'b')),
           md5(i::text)::uuid
    FROM generate_series(%s::bigint, %s::bigint) AS i
"""


# --- the walex side (runs in a child process, or in-process for --profile) ---


async def walex_drain(
    dsn: str,
    slot: str,
    publication: str,
    end_lsn: int,
    last_xid: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Drain *slot* up to the transaction that ends at *end_lsn*; return the figures."""
    records = 0
    events = 0
    batches = 0
    checked = False
    cpu_start = _cpu_seconds()
    t_start = time.perf_counter()
    stream = walex.connect(dsn, publication=publication, slot=slot, durable=True, **options)
    async with stream:
        t_open = time.perf_counter()
        t_first: float | None = None
        async for batch in stream:
            if t_first is None:
                t_first = time.perf_counter()
            batch_events = batch.events
            # The loop a user's handler would run, doing nothing but reading
            # each record (their values were converted when the event was made).
            for event in batch_events:
                if event.new_record is not None:
                    records += 1
                if event.old_record is not None:
                    records += 1
            events += len(batch_events)
            batches += 1
            if not checked and batch_events:
                _check_values(batch_events[0])
                checked = True
            if batch.last and (
                (batch.end_lsn is not None and batch.end_lsn >= end_lsn) or batch.xid == last_xid
            ):
                break
        t_done = time.perf_counter()
        cpu_done = _cpu_seconds()
    t_closed = time.perf_counter()
    return {
        "events": events,
        "records": records,
        "batches": batches,
        "connect_s": t_open - t_start,
        "drain_s": t_done - t_open,
        "total_s": t_done - t_start,
        "first_batch_s": (t_first or t_done) - t_start,
        "close_s": t_closed - t_done,
        "cpu_s": cpu_done - cpu_start,
        "protocol": stream.protocol_version,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _check_values(event: walex.Event) -> None:
    """Fail loudly if the values are not the Python objects the bench claims."""
    import datetime
    import decimal
    import uuid

    record = event.new_record if event.new_record is not None else event.old_record
    assert record is not None, event
    expected = {
        "id": int,
        "name": str,
        "qty": int,
        "price": decimal.Decimal,
        "active": bool,
        "created_at": datetime.datetime,
        "attrs": dict,
        "ref": uuid.UUID,
    }
    wrong = {
        k: type(record.get(k)).__name__
        for k, t in expected.items()
        if not isinstance(record.get(k), t)
    }
    if wrong:
        raise SystemExit(f"walex delivered unconverted values: {wrong}")


def child_main(spec: str) -> None:
    """``--child``: one drain, walex's or the bare reader's, figures printed as one JSON line."""
    args = json.loads(spec)
    if os.environ.get("WALEX_BENCH_GC") == "off":
        import gc

        gc.disable()
    if args.get("bare"):
        result = bare_drain(
            args["dsn"],
            args["slot"],
            args["publication"],
            args["end_lsn"],
            args["last_xid"],
            args["proto"],
            args.get("pause_us", 300),
        )
    else:
        result = asyncio.run(
            walex_drain(
                args["dsn"],
                args["slot"],
                args["publication"],
                args["end_lsn"],
                args["last_xid"],
                args["options"],
            )
        )
    # ru_maxrss is in kB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    print(json.dumps(result), flush=True)


# --- the bare reader: the server's pace, for any client ----------------------------


def bare_drain(
    dsn: str,
    slot: str,
    publication: str,
    end_lsn: int,
    last_xid: int,
    proto: int,
    pause_us: int = 300,
) -> dict[str, Any]:
    """Read the slot's frames and throw them away: the server's own pace.

    No decoding and no values: a count of the row changes, and a look at each
    transaction's xid and end LSN, to stop where walex's drain stops. How a
    client reads changes what the walsender pays to send (bench/README.md: a
    reader that waits on the socket, one that reads again without a pause and
    one that sleeps until 64 kB are there each cost the walsender 1.2-2x what
    walex does).
    This one reads the way walex does while it decodes: ``consume_input``,
    every complete frame, and when that brought nothing it stays busy for
    *pause_us* microseconds before it reads again. Of the patterns tried, this
    one cost the walsender least, so its rate is about the most the server
    delivers to any client on this machine.
    """
    import struct

    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    changes = 0
    xid = 0
    commit_end = struct.Struct(">Q")
    begin_xid = struct.Struct(">I")
    cpu_start = _cpu_seconds()
    t_start = time.perf_counter()
    conn = pq.PGconn.connect(make_conninfo(dsn, replication="database").encode())
    if conn.status != pq.ConnStatus.OK:
        raise SystemExit(f"bare reader: {conn.get_error_message()}")
    query = (
        f"START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '{proto}', "
        f"publication_names '{publication}', messages 'true')"
    )
    res = conn.exec_(query.encode())
    if res.status != pq.ExecStatus.COPY_BOTH:
        raise SystemExit(f"bare reader: {conn.get_error_message()}")
    conn.nonblocking = 1
    get = conn.get_copy_data
    done = False
    while not done:
        conn.consume_input()
        frames = 0
        while True:
            n, data = get(1)
            if n > 0:
                frames += 1
                # XLogData: 'w', start, end, clock (25 bytes), then the pgoutput
                # message: Begin 'B' (final LSN, timestamp, xid), Commit 'C' (flags,
                # commit LSN, end LSN, timestamp).
                if data[0] == 0x77:
                    kind = data[25]
                    if kind in b"IUD":
                        changes += 1
                    elif kind == 0x42:
                        xid = begin_xid.unpack_from(data, 42)[0]
                    elif kind == 0x43 and (
                        xid == last_xid or commit_end.unpack_from(data, 35)[0] >= end_lsn
                    ):
                        done = True
                        break
            elif n == 0:
                break
            else:
                raise SystemExit(f"bare reader: the stream ended: {conn.get_error_message()}")
        if not frames:
            until = time.perf_counter() + pause_us / 1e6
            while time.perf_counter() < until:
                pass
    seconds = time.perf_counter() - t_start
    cpu = _cpu_seconds() - cpu_start
    conn.finish()
    return {"events": changes, "total_s": seconds, "cpu_s": cpu}


# --- running children -----------------------------------------------------------


@dataclass
class Finished:
    seconds: float
    exit_code: int
    maxrss_mb: float
    cpu_s: float
    stdout: str
    stderr: str
    server_cpu_s: float | None = None
    server_waits: int | None = None


def run_timed(cmd: list[str], timeout: float = DRAIN_TIMEOUT) -> Finished:
    """Run *cmd*, wall-clock it from launch to exit, and get its own peak RSS (wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        rss = usage.ru_maxrss / 1024
        return Finished(seconds, proc.returncode, rss, cpu, out.read(), err.read())


class WalsenderCPU:
    """The CPU time of the walsender that serves *slot*, sampled from /proc in a thread.

    It tells the server's share of a drain from the client's: pg_recvlogical
    costs the server what walex costs it, so the difference between the two
    drains is on the client side, or in how the two overlap.
    """

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn = dsn
        self.slot = slot
        self.seconds: float | None = None
        # Voluntary context switches: how often the walsender waited (for
        # the client to make room in the socket, or for WAL). A handful means
        # it was busy the whole drain, limited by its own CPU.
        self.waits: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WalsenderCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        pid = None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while pid is None and not self._stop.is_set():
                pid = sql(
                    conn,
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    self.slot,
                )
                if pid is None:
                    self._stop.wait(0.02)
        if pid is None:
            return
        tick = os.sysconf("SC_CLK_TCK")
        stopping = False
        while True:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                with open(f"/proc/{pid}/status") as f:
                    status = f.read()
            except OSError:
                return  # gone, or not ours to read: the last sample stands
            self.seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    self.waits = int(line.split()[1])
            if stopping:
                return
            stopping = self._stop.wait(0.05)


def run_watched(cmd: list[str], dsn: str, slot: str) -> Finished:
    """:func:`run_timed`, with the CPU and the waits of the walsender serving *slot*."""
    with WalsenderCPU(dsn, slot) as server:
        done = run_timed(cmd)
    done.server_cpu_s = server.seconds
    done.server_waits = server.waits
    return done


def fmt_s(seconds: float | None) -> str:
    return "  n/a" if seconds is None else f"{seconds:5.2f}"


def recvlogical(
    binaries: PostgresBinaries, dsn: str, slot: str, end_lsn: int, proto: int
) -> Finished:
    tool = binaries.bindir / "pg_recvlogical"
    if not tool.exists():  # pragma: no cover - both installs here ship it
        tool = Path("/usr/bin/pg_recvlogical")
    cmd = [
        str(tool), "-d", dsn, "--slot", slot, "--start", "-E", str(walex.LSN(end_lsn)),
        "--no-loop", "-f", "/dev/null",
        "-o", f"proto_version={proto}", "-o", f"publication_names={PUBLICATION}",
        "-o", "messages=true",
    ]  # fmt: skip
    done = run_watched(cmd, dsn, slot)
    if done.exit_code != 0:
        raise SystemExit(f"pg_recvlogical failed ({done.exit_code}): {done.stderr.strip()}")
    return done


def walex_child(
    dsn: str,
    slot: str,
    publication: str,
    end_lsn: int,
    last_xid: int,
    options: dict[str, Any],
    prefix: list[str] | None = None,
) -> tuple[dict[str, Any], Finished]:
    spec = {
        "dsn": dsn,
        "slot": slot,
        "publication": publication,
        "end_lsn": end_lsn,
        "last_xid": last_xid,
        "options": options,
    }
    return run_child(spec, prefix)


def bare_child(dsn: str, slot: str, backlog: Backlog, proto: int) -> dict[str, Any]:
    spec = {
        "bare": True,
        "dsn": dsn,
        "slot": slot,
        "publication": PUBLICATION,
        "end_lsn": backlog.end_lsn,
        "last_xid": backlog.last_xid,
        "proto": proto,
    }
    return run_child(spec)[0]


def run_child(
    spec: dict[str, Any], prefix: list[str] | None = None
) -> tuple[dict[str, Any], Finished]:
    """One ``--child`` drain in its own process, with its walsender's CPU sampled."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = run_watched([*(prefix or []), *argv], spec["dsn"], spec["slot"])
    if done.exit_code != 0:
        raise SystemExit(f"child drain failed ({done.exit_code}):\n{done.stderr}{done.stdout}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu_s"] = done.server_cpu_s
    result["server_waits"] = done.server_waits
    return result, done


# --- the server and the data ------------------------------------------------------


def pick_binaries(major: int) -> PostgresBinaries:
    found = {b.major: b for b in find_binaries()}
    if major not in found:
        raise SystemExit(f"no Postgres {major} found (have: {sorted(found) or 'none'})")
    return found[major]


def sql(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    return row[0] if row else None


def create_schema(conn: psycopg.Connection[Any]) -> None:
    for table, pub in (("bench_rows", PUBLICATION), ("bench_big", BIG_PUBLICATION)):
        conn.execute(f"CREATE TABLE {table} ({COLUMNS})")
        conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
        conn.execute(f"CREATE PUBLICATION {pub} FOR TABLE {table}")


def create_slot(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])


@dataclass
class Backlog:
    inserts: int
    updates: int
    deletes: int
    txns: int
    end_lsn: int
    last_xid: int
    row_bytes: float
    seconds: float
    first_xid: int = 0

    @property
    def changes(self) -> int:
        return self.inserts + self.updates + self.deletes

    @property
    def records(self) -> int:
        # REPLICA IDENTITY FULL: an update carries the new and the old row.
        return self.inserts + 2 * self.updates + self.deletes


def _exec(conn: psycopg.Connection[Any], query: str, params: list[Any], expect: int) -> None:
    cur = conn.execute(query, params)
    if cur.rowcount != expect:
        raise SystemExit(f"backlog: {query.split()[0]} touched {cur.rowcount} rows, not {expect}")


def write_backlog(conn: psycopg.Connection[Any], txns: int) -> Backlog:
    """*txns* transactions of 1,300 changes: 1,000 inserts, 200 updates, 100 deletes.

    Transaction k inserts ids k*1000+1 .. k*1000+1000, in two halves, and
    between and after them updates (two columns) and deletes rows of the
    block before (of its own block for k = 0), so that every statement
    touches exactly the rows it should.
    """
    insert = f"INSERT INTO bench_rows {ROW_SELECT}"
    update = "UPDATE bench_rows SET qty = qty + 1, price = price + 1.00 WHERE id BETWEEN %s AND %s"
    delete = "DELETE FROM bench_rows WHERE id BETWEEN %s AND %s"
    t0 = time.perf_counter()
    first_xid = last_xid = 0
    for k in range(txns):
        base = k * TXN_INSERTS
        if k == 0:  # rows 1..500 exist after the first half
            upd = [(1, 100), (101, 200)]
            dele = [(451, 500), (401, 450)]
        else:
            prev = base - TXN_INSERTS
            upd = [(prev + 601, prev + 700), (prev + 701, prev + 800)]
            dele = [(prev + 901, prev + 950), (prev + 951, prev + 1000)]
        with conn.transaction():
            for half in range(2):
                lo = base + half * 500 + 1
                _exec(conn, insert, [lo, lo + 499], 500)
                _exec(conn, update, list(upd[half]), 100)
                _exec(conn, delete, list(dele[half]), 50)
            xid = sql(conn, "SELECT (txid_current() % 4294967296)::bigint")
            if k == 0:
                first_xid = xid
            last_xid = xid
    seconds = time.perf_counter() - t0
    end_lsn = int(walex.LSN.parse(str(sql(conn, "SELECT pg_current_wal_insert_lsn()::text"))))
    row_bytes = float(sql(conn, "SELECT avg(pg_column_size(t.*)) FROM bench_rows t") or 0)
    return Backlog(
        inserts=txns * TXN_INSERTS,
        updates=txns * 200,
        deletes=txns * 100,
        txns=txns,
        end_lsn=end_lsn,
        last_xid=last_xid,
        row_bytes=row_bytes,
        seconds=seconds,
        first_xid=first_xid,
    )


def write_big(conn: psycopg.Connection[Any], first_id: int, rows: int) -> tuple[int, int, float]:
    """One transaction inserting *rows* rows; returns (end LSN, xid, seconds)."""
    t0 = time.perf_counter()
    with conn.transaction():
        _exec(conn, f"INSERT INTO bench_big {ROW_SELECT}", [first_id, first_id + rows - 1], rows)
        xid = sql(conn, "SELECT (txid_current() % 4294967296)::bigint")
    seconds = time.perf_counter() - t0
    end_lsn = int(walex.LSN.parse(str(sql(conn, "SELECT pg_current_wal_insert_lsn()::text"))))
    return end_lsn, xid, seconds


# --- reporting --------------------------------------------------------------------


def rate(changes: int, seconds: float) -> str:
    return f"{changes / seconds:>9,.0f} changes/s"


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--walex-option takes KEY=VALUE, not {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


# --- the benchmarks -----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    binaries = pick_binaries(args.pg)
    proto = 4 if binaries.major >= 16 else 3 if binaries.major >= 15 else 2
    options = {"max_batch_events": 5000, **parse_options(args.walex_option)}
    txns = max(1, args.rows // TXN_INSERTS)
    rounds = 1 if args.profile else 2 if args.instructions else args.rounds
    print(
        f"Postgres {binaries.version} ({binaries.bindir}); settings on top of walex.embedded "
        f"defaults: {SERVER_SETTINGS}"
    )
    print(
        f"walex options: {options}; python {sys.version.split()[0]}, "
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__})"
    )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before the run (1/5/15 min): {load} on {os.cpu_count()} CPUs")
    pg = EmbeddedPostgres(binaries, settings=SERVER_SETTINGS)
    pg.start()
    try:
        dsn = pg.create_database("bench")
        if args.unix:
            dsn = pg.dsn("bench", host=str(pg.socket_dir))
        print(f"clients connect over {'the Unix socket' if args.unix else 'TCP (loopback)'}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_schema(conn)
            backlog: Backlog | None = None
            slots: list[tuple[str, str, str]] = []
            if not args.big_only:
                # --profile and --instructions drain walex's slots only.
                slots = [
                    (f"bench_recv_{r}", f"bench_walex_{r}", f"bench_bare_{r}")
                    for r in range(rounds)
                ]
                for recv_slot, walex_slot, bare_slot in slots:
                    create_slot(conn, walex_slot)
                    if not (args.profile or args.instructions):
                        create_slot(conn, recv_slot)
                        create_slot(conn, bare_slot)
                backlog = write_backlog(conn, txns)
                conn.execute("CHECKPOINT")
                print(
                    f"backlog written in {backlog.seconds:.1f} s: {backlog.changes:,} changes "
                    f"in {backlog.txns} txns, avg row {backlog.row_bytes:.0f} bytes, "
                    f"end LSN {walex.LSN(backlog.end_lsn)}"
                )
            if args.instructions:
                assert backlog is not None
                return instructions(
                    dsn, slots[0][1], slots[-1][1], backlog, options, args.instructions_out
                )
            if args.profile:
                assert backlog is not None
                return profile(
                    dsn, slots[0][1], backlog, options, args.profile_top, args.profile_out
                )
            main_figures = drain_rounds(binaries, dsn, proto, slots, backlog, options)
            big_figures = big_test(conn, dsn, options, args.big_rows) if not args.no_big else None
        summary(binaries, backlog, main_figures, big_figures)
    finally:
        pg.cleanup()
    return 0


def drain_rounds(
    binaries: PostgresBinaries,
    dsn: str,
    proto: int,
    slots: list[tuple[str, str, str]],
    backlog: Backlog | None,
    options: dict[str, Any],
) -> dict[str, Any] | None:
    """Each round drains three slots: pg_recvlogical's, walex's and the bare reader's."""
    if backlog is None:
        return None
    n = backlog.changes
    recv: list[Finished] = []
    runs: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    print(
        f"{'':6} {'pg_recvlogical':>30} {'client':>6} {'server':>6}   "
        f"{'walex (connect -> drained)':>30} {'drain':>6} {'connect':>7} {'close':>6} "
        f"{'client':>6} {'server':>6} {'peak':>9}   {'bare reader':>30} {'server':>6}"
    )
    print(
        f"{'round':6} {'(launch -> exit)':>30} {'cpu s':>6} {'cpu s':>6}   {'':>30} "
        f"{'only s':>6} {'s':>7} {'s':>6} {'cpu s':>6} {'cpu s':>6} {'RSS':>9}   "
        f"{'(connect -> drained)':>30} {'cpu s':>6}"
    )
    order = ["recv", "walex", "bare"]
    for r, (recv_slot, walex_slot, bare_slot) in enumerate(slots):
        # Rotate who goes first, so that none always gets the warmer cache.
        for who in order[r % 3 :] + order[: r % 3]:
            if who == "recv":
                recv.append(recvlogical(binaries, dsn, recv_slot, backlog.end_lsn, proto))
            elif who == "bare":
                got = bare_child(dsn, bare_slot, backlog, proto)
                if got["events"] != n:
                    raise SystemExit(f"the bare reader saw {got['events']} changes, not {n}")
                bare.append(got)
            else:
                res, _done = walex_child(
                    dsn, walex_slot, PUBLICATION, backlog.end_lsn, backlog.last_xid, options
                )
                if res["events"] != n or res["records"] != backlog.records:
                    raise SystemExit(
                        f"walex saw {res['events']} events / {res['records']} records, "
                        f"expected {n} / {backlog.records}"
                    )
                runs.append(res)
        rv, wx, br = recv[-1], runs[-1], bare[-1]
        print(
            f"{r + 1:<6} {rate(n, rv.seconds)} ({rv.seconds:5.2f} s) {rv.cpu_s:6.2f} "
            f"{fmt_s(rv.server_cpu_s):>6}   "
            f"{rate(n, wx['total_s'])} ({wx['total_s']:5.2f} s) {wx['drain_s']:6.2f} "
            f"{wx['connect_s']:7.3f} {wx['close_s']:6.3f} {wx['cpu_s']:6.2f} "
            f"{fmt_s(wx['server_cpu_s']):>6} {wx['maxrss_mb']:6.1f} MB   "
            f"{rate(n, br['total_s'])} ({br['total_s']:5.2f} s) {fmt_s(br['server_cpu_s']):>6}",
            flush=True,
        )
    recv_times = [f.seconds for f in recv]
    walex_times = [w["total_s"] for w in runs]
    bare_times = [b["total_s"] for b in bare]
    figures = {
        "recv_median": statistics.median(recv_times),
        "recv_best": min(recv_times),
        "walex_median": statistics.median(walex_times),
        "walex_best": min(walex_times),
        "bare_median": statistics.median(bare_times),
        "bare_best": min(bare_times),
        "walex_drain_median": statistics.median(w["drain_s"] for w in runs),
        "walex_cpu_median": statistics.median(w["cpu_s"] for w in runs),
        "recv_server_cpu": _median_known(f.server_cpu_s for f in recv),
        "walex_server_cpu": _median_known(w["server_cpu_s"] for w in runs),
        "bare_server_cpu": _median_known(b["server_cpu_s"] for b in bare),
        "recv_server_waits": _median_known(f.server_waits for f in recv),
        "walex_server_waits": _median_known(w["server_waits"] for w in runs),
        "bare_server_waits": _median_known(b["server_waits"] for b in bare),
        "rss_max": max(w["maxrss_mb"] for w in runs),
        "protocol": runs[-1]["protocol"],
    }
    for label, rt, wt, bt in (
        ("best", figures["recv_best"], figures["walex_best"], figures["bare_best"]),
        ("median", figures["recv_median"], figures["walex_median"], figures["bare_median"]),
    ):
        print(
            f"{label:<6} {rate(n, rt)} ({rt:5.2f} s) {'':6} {'':6}   {rate(n, wt)} ({wt:5.2f} s) "
            f"{'':>55}   {rate(n, bt)} ({bt:5.2f} s)"
        )
    return figures


def _median_known(values: Iterable[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def big_test(
    conn: psycopg.Connection[Any], dsn: str, options: dict[str, Any], sizes: list[int]
) -> list[tuple[int, dict[str, Any]]]:
    """One transaction per size, each drained by walex alone from its own slot."""
    written: list[tuple[int, str, int, int]] = []
    next_id = 1
    for rows in sizes:
        slot = f"bench_big_{rows}"
        # Made right before its transaction: the slot sees that one and the
        # later ones, and its drain stops after its own.
        create_slot(conn, slot)
        end_lsn, xid, seconds = write_big(conn, next_id, rows)
        next_id += rows
        print(f"big txn of {rows:,} rows written in {seconds:.1f} s", flush=True)
        written.append((rows, slot, end_lsn, xid))
    conn.execute("CHECKPOINT")
    results = []
    for rows, slot, end_lsn, xid in written:
        res, done = walex_child(dsn, slot, BIG_PUBLICATION, end_lsn, xid, options)
        if res["events"] != rows:
            raise SystemExit(f"walex saw {res['events']} events of the {rows}-row txn")
        print(
            f"big txn {rows:>9,} rows: {rate(rows, res['total_s'])} ({res['total_s']:.2f} s, "
            f"{res['batches']} batches), peak RSS {res['maxrss_mb']:.1f} MB "
            f"(wait4: {done.maxrss_mb:.1f} MB)",
            flush=True,
        )
        results.append((rows, res))
    return results


def summary(
    binaries: PostgresBinaries,
    backlog: Backlog | None,
    main: dict[str, Any] | None,
    big: list[tuple[int, dict[str, Any]]] | None,
) -> None:
    print()
    print("=" * 100)
    if backlog is not None and main is not None:
        n = backlog.changes
        ratio = main["recv_median"] / main["walex_median"]
        best_ratio = main["recv_best"] / main["walex_best"]
        print(
            f"backlog: {n} changes ({backlog.inserts} ins / {backlog.updates} upd / "
            f"{backlog.deletes} del) in {backlog.txns} txns, PG {binaries.version}, "
            f"REPLICA IDENTITY FULL, protocol {main['protocol']}, "
            f"avg row {backlog.row_bytes:.0f} bytes"
        )
        print(
            f"pg_recvlogical : {n / main['recv_median']:>9,.0f} changes/s  "
            f"({main['recv_median']:.2f} s, median)"
        )
        print(
            f"walex          : {n / main['walex_median']:>9,.0f} changes/s  "
            f"({main['walex_median']:.2f} s, median, connect -> drained)   ratio {ratio:.2f}x "
            f"(best vs best {best_ratio:.2f}x)   target >= {TARGET_RATIO:.1f}x  "
            f"{met(ratio >= TARGET_RATIO)}"
        )
        bare = main["bare_median"]
        print(
            f"bare reader    : {n / bare:>9,.0f} changes/s  ({bare:.2f} s, median, connect -> "
            f"drained; reads and discards, no decoding)   = {main['recv_median'] / bare:.2f}x "
            f"pg_recvlogical: about the most the server delivers to a client here; walex gets "
            f"{bare / main['walex_median']:.0%} of it"
        )
        print(f"walex peak RSS : {main['rss_max']:.0f} MB")
        cpu = main["walex_cpu_median"]
        print(
            f"walex CPU      : {cpu:.2f} s of CPU in the walex process per drain (median), "
            f"{n / cpu:,.0f} changes per CPU-second: its ceiling given a core of its own"
        )
        server = [
            c
            for c in (main["recv_server_cpu"], main["walex_server_cpu"], main["bare_server_cpu"])
            if c
        ]
        if server:
            # The same decoding serves both clients; the smaller figure is the
            # least the server needs, so no client can drain faster than this.
            ceiling = n / min(server)
            print(
                f"walsender CPU  : {fmt_s(main['recv_server_cpu']).strip()} s serving "
                f"pg_recvlogical, {fmt_s(main['walex_server_cpu']).strip()} s serving walex, "
                f"{fmt_s(main['bare_server_cpu']).strip()} s serving the bare reader "
                f"(median): its CPU alone caps any client near {ceiling:,.0f} "
                f"changes/s = {ceiling / (n / main['recv_median']):.2f}x pg_recvlogical"
            )
            if main["walex_server_waits"] is not None:
                print(
                    f"walsender waits: {main['recv_server_waits']:.0f} serving pg_recvlogical, "
                    f"{main['walex_server_waits']:.0f} serving walex, "
                    f"{main['bare_server_waits']:.0f} serving the bare reader (voluntary "
                    f"context switches in a drain, median): a handful means it never waited "
                    f"for the client, its own CPU set the pace"
                )
        else:
            print("walsender CPU  : n/a (/proc not readable)")
    if big:
        parts = [f"{rows:,}-row txn: peak RSS {res['maxrss_mb']:.0f} MB" for rows, res in big]
        rss = [res["maxrss_mb"] for _rows, res in big]
        spread = max(rss) - min(rss)
        flat = spread <= max(FLAT_SLACK_MB, 0.10 * min(rss))
        ok = max(rss) <= TARGET_RSS_MB and flat
        print(
            f"{'; '.join(parts)}   target <= {TARGET_RSS_MB:.0f} MB and flat "
            f"(spread {spread:.0f} MB): {met(ok)}"
        )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end (1/5/15 min): {load} on {os.cpu_count()} CPUs")
    print("=" * 100)


def profile(
    dsn: str, slot: str, backlog: Backlog, options: dict[str, Any], top: int, out: str | None
) -> int:
    """Drain one slot in this process under cProfile and print the hottest functions."""
    if os.environ.get("WALEX_BENCH_PROFILER") == "pyinstrument":
        from pyinstrument import Profiler

        sampler = Profiler(interval=0.0005)
        sampler.start()
        res = asyncio.run(
            walex_drain(dsn, slot, PUBLICATION, backlog.end_lsn, backlog.last_xid, options)
        )
        sampler.stop()
        print(f"walex under pyinstrument: {res['events']:,} events in {res['total_s']:.2f} s")
        print(sampler.output_text(unicode=False, color=False, show_all=False))
        return 0
    profiler = cProfile.Profile()
    profiler.enable()
    res = asyncio.run(
        walex_drain(dsn, slot, PUBLICATION, backlog.end_lsn, backlog.last_xid, options)
    )
    profiler.disable()
    n = backlog.changes
    print(
        f"walex under cProfile: {res['events']:,} events in {res['total_s']:.2f} s "
        f"({n / res['total_s']:,.0f} changes/s with profiling overhead)"
    )
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats(pstats.SortKey.TIME).print_stats(top)
    if out:
        stats.dump_stats(out)
        print(f"profile saved to {out} (open with: python -m pstats {out}, or snakeviz)")
    return 0


def instructions(
    dsn: str,
    small_slot: str,
    big_slot: str,
    backlog: Backlog,
    options: dict[str, Any],
    out_dir: str | None = None,
) -> int:
    """Count the instructions walex executes per change, with callgrind.

    Two walex children under ``valgrind --tool=callgrind``: one drains only
    the backlog's first transaction, the other the whole backlog; the
    difference divided by the difference in changes is what one more change
    costs, start-up and connection left out. The count is the same from run
    to run (a busy or slow machine changes seconds, not instructions), so it
    shows what a code change gains where timings here vary by a quarter.
    With *out_dir*, callgrind's files are kept there (``small.out`` and
    ``whole.out``) for ``callgrind_annotate``.
    """
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    counts = []
    for slot, last_xid, expect, name in (
        (small_slot, backlog.first_xid, TXN_CHANGES, "small"),
        (big_slot, backlog.last_xid, backlog.changes, "whole"),
    ):
        out = os.path.join(out_dir, f"{name}.out") if out_dir else "/dev/null"
        # An end LSN no batch reaches: each child stops at the xid.
        res, done = walex_child(
            dsn,
            slot,
            PUBLICATION,
            2**64 - 1,
            last_xid,
            options,
            prefix=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"],
        )
        if res["events"] != expect:
            raise SystemExit(f"walex saw {res['events']} events, expected {expect}")
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(f"no instruction count from callgrind:\n{done.stderr}")
        counts.append(int(found.group(1)))
        print(f"walex drain of {expect:,} changes: {counts[-1]:,} instructions", flush=True)
    per_change = (counts[1] - counts[0]) / (backlog.changes - TXN_CHANGES)
    print(
        f"walex instructions per change: {per_change:,.0f} (callgrind; the difference of the "
        f"two drains over the difference in changes, {backlog.changes - TXN_CHANGES:,})"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", type=int, default=15, help="Postgres major version (15 or 16)")
    parser.add_argument(
        "--rows",
        type=int,
        default=200_000,
        help="inserted rows in the backlog; updates are 1/5 and deletes 1/10 "
        "of it, in transactions of 1,300 changes (default 200000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="drain rounds (default 3)")
    parser.add_argument("--no-big", action="store_true", help="skip the big-transaction test")
    parser.add_argument("--big-only", action="store_true", help="only the big-transaction test")
    parser.add_argument(
        "--big-rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1_000_000, 250_000],
        help="sizes of the big transactions (default 1000000,250000)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="drain once in-process under cProfile; print the top functions",
    )
    parser.add_argument(
        "--profile-top", type=int, default=30, help="functions to print (default 30)"
    )
    parser.add_argument("--profile-out", metavar="FILE", help="also save the cProfile stats")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count walex's instructions per change under valgrind's callgrind "
        "(steady where timings are not; use with --rows 50000, it runs ~50x slower)",
    )
    parser.add_argument(
        "--instructions-out",
        metavar="DIR",
        help="with --instructions: keep callgrind's files in DIR (small.out, whole.out) "
        "for callgrind_annotate",
    )
    parser.add_argument(
        "--unix",
        action="store_true",
        help="every client connects over the server's Unix socket instead of TCP on "
        "127.0.0.1 (the target is set over TCP; see bench/README.md)",
    )
    parser.add_argument(
        "--walex-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra walex.connect option, e.g. binary=true (JSON values)",
    )
    parser.add_argument("--child", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.profile or args.instructions) and args.big_only:
        parser.error("--profile and --instructions drain the backlog; leave out --big-only")
    if args.child:
        child_main(args.child)
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        return run(args)
    return 130


if __name__ == "__main__":
    sys.exit(main())

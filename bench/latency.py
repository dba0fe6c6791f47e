"""Commit-to-handler latency through a WalEx app at a steady transaction rate.

::

    python bench/latency.py                      # 1,000 txn/s for 30 s, the newest Postgres found
    python bench/latency.py --pg 15 --rate 500 --seconds 10
    python bench/latency.py --walex-option binary=true

A writer process commits single-row transactions on a fixed schedule
(``--rate`` per second, each at its planned time; a late one is sent at
once, never skipped). Each row carries ``time.monotonic_ns()`` taken just
before its INSERT, and the writer notes in shared memory the moment its
commit returned. The app's async handler notes ``time.monotonic_ns()`` when it
receives the event. CLOCK_MONOTONIC is one clock for the whole machine, so
the two processes' readings compare directly.

Printed, in milliseconds, p50 / p99 / max of:

- commit → handler: from the writer seeing its COMMIT return to the handler
  receiving the event (the figure the target is about; it can be slightly
  negative when the walsender is faster than the writer's own ack);
- insert → handler: from just before the INSERT (an upper bound: it also
  counts the statement and the commit).

Target: p99 commit → handler <= 5 ms, printed as MET or NOT MET.
The server is ``walex.embedded``'s (fsync off, synchronous_commit on).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any

import psycopg

import walex
from walex import Event, WalEx
from walex.embedded import EmbeddedPostgres, find_binaries

TARGET_P99_MS = 5.0


def writer(dsn: str, rate: float, count: int, committed: Any, ready: Any, go: Any) -> None:
    """Commit *count* single-row transactions at *rate* per second."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        ready.set()
        go.wait()
        start = time.monotonic()
        for i in range(count):
            due = start + i / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            conn.execute("INSERT INTO lat VALUES (%s, %s)", (i, time.monotonic_ns()))
            committed[i] = time.monotonic_ns()


def percentiles(values_ns: list[int]) -> str:
    ms = sorted(v / 1e6 for v in values_ns)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {p50:7.3f}   p99 {p99:7.3f}   max {ms[-1]:8.3f}   min {ms[0]:7.3f}"


def p99_ms(values_ns: list[int]) -> float:
    ms = sorted(v / 1e6 for v in values_ns)
    return ms[min(len(ms) - 1, int(len(ms) * 0.99))]


def parse_option(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    elif raw.isdigit():
        value = int(raw)
    return key, value


async def measure(dsn: str, args: argparse.Namespace) -> int:
    count = int(args.rate * args.seconds)
    received = [0] * count
    stamped = [0] * count
    app = WalEx(
        name="latency",
        url=dsn,
        publication="lat",
        durable_slot=False,
        **dict(parse_option(o) for o in args.walex_option),
    )
    seen = 0
    done = asyncio.Event()

    @app.on_insert("lat")
    async def on_insert(events: list[Event]) -> None:
        nonlocal seen
        now = time.monotonic_ns()
        for e in events:
            rec = e.new_record
            assert rec is not None
            received[rec["id"]] = now
            stamped[rec["id"]] = rec["t_ns"]
        seen += len(events)
        if seen >= count:
            done.set()

    async def raw() -> None:
        # The engine alone, for comparison: the same handler without the app.
        async with walex.connect(dsn, publication="lat", **app.settings.engine) as stream:
            await asyncio.to_thread(ready.wait)
            go.set()
            async for batch in stream:
                await on_insert(batch.events)
                if done.is_set():
                    break

    ctx = mp.get_context("spawn")
    committed = ctx.Array("q", count, lock=False)
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=writer, args=(dsn, args.rate, count, committed, ready, go))
    proc.start()
    started = time.monotonic()
    try:
        async with asyncio.timeout(args.seconds * 3 + 30):
            if args.engine_only:
                await raw()
            else:
                async with app:
                    await asyncio.to_thread(ready.wait)
                    go.set()
                    started = time.monotonic()
                    await done.wait()
    except TimeoutError:
        print(f"FAILED: the handler saw {seen} of {count} transactions", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    await asyncio.to_thread(proc.join)
    commit_lat = [received[i] - committed[i] for i in range(count)]
    insert_lat = [received[i] - stamped[i] for i in range(count)]
    print(f"through        {'walex.connect alone' if args.engine_only else 'a WalEx app'}")
    print(
        f"transactions   {count} single-row commits in {elapsed:.1f} s "
        f"({count / elapsed:,.0f}/s achieved, {args.rate:,.0f}/s planned)"
    )
    print(f"commit→handler {percentiles(commit_lat)}   (ms)")
    print(f"insert→handler {percentiles(insert_lat)}   (ms)")
    p99 = p99_ms(commit_lat)
    verdict = "MET" if p99 <= TARGET_P99_MS else "NOT MET"
    print(f"target         p99 commit→handler <= {TARGET_P99_MS:g} ms: {verdict} ({p99:.3f} ms)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="transactions per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to write")
    parser.add_argument("--pg", type=int, help="Postgres major version (default: the newest)")
    parser.add_argument(
        "--walex-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a WalEx/engine option, e.g. binary=true",
    )
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="the same measure on walex.connect alone, without the app (for comparison)",
    )
    args = parser.parse_args()
    found = {b.major: b for b in find_binaries()}
    if not found:
        print("no Postgres found: pip install 'walex[embedded]'", file=sys.stderr)
        return 1
    binaries = found[args.pg] if args.pg else found[max(found)]
    with EmbeddedPostgres(binaries) as server:
        dsn = server.create_database("latency")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE lat (id bigint PRIMARY KEY, t_ns bigint NOT NULL)")
            conn.execute("CREATE PUBLICATION lat FOR TABLE lat")
        print(f"postgres       {binaries.version}; python {sys.version.split()[0]}")
        return asyncio.run(measure(dsn, args))


if __name__ == "__main__":
    sys.exit(main())

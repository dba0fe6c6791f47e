"""Encode-only benchmark: µs per event from an Event to its wire bytes.

Captures the drain benchmark's changes (bench/drain.py: its table, its row
shape and its mix of 1,000 inserts, 200 updates under REPLICA IDENTITY FULL
and 100 deletes per transaction) through walex from a throw-away Postgres
(walex.embedded), then times, in the same run and on the same events:

- ``walex.wire.dumpb``, C: the C encoder (walex._accel), what destinations run;
- ``walex.wire.dumpb``, pure Python: the same function with the C encoder off
  (what ``WALEX_IMPL=python`` runs);
- ``orjson.dumps(to_dict(e))``: the dict, written by orjson (what dumpb did
  before the C encoder; for reference);
- ``json.dumps(to_dict(e), ...)``: the reference document (``wire.dumps``).

Every event's bytes are checked against ``wire.dumps(e).encode()`` first.

Usage::

    python bench/wire.py                    # 13,000 events from Postgres 15, best of 7 rounds
    python bench/wire.py --rows 50000 --rounds 11
    python bench/wire.py --synthetic        # the same row shape made in Python, no server

To time the ``dumpb`` of an earlier commit on the same events, put its
``src`` first (bench/README.md shows how), e.g.
``PYTHONPATH=/tmp/base/src python bench/wire.py --synthetic``.

A timing is not a test: this prints figures and exits 0 (non-zero only when
the encoders disagree).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

import walex
from walex import _accel, wire
from walex.embedded import EmbeddedPostgres
from walex.events import Event, Source, Transaction
from walex.lsn import LSN

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drain  # the drain benchmark's table, rows and backlog

CENT = Decimal("0.01")

try:
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]


async def capture(dsn: str, slot: str, count: int) -> list[Event]:
    """The first *count* events of *slot*."""
    events: list[Event] = []
    async with walex.connect(dsn, publication=drain.PUBLICATION, slot=slot, durable=True) as stream:
        async for batch in stream:
            events.extend(batch.events)
            if len(events) >= count:
                break
    return events[:count]


def from_server(rows: int, pg_major: int) -> tuple[list[Event], str]:
    binaries = drain.pick_binaries(pg_major)
    pg = EmbeddedPostgres(binaries, settings=drain.SERVER_SETTINGS)
    pg.start()
    try:
        dsn = pg.create_database("bench")
        with psycopg.connect(dsn, autocommit=True) as conn:
            drain.create_schema(conn)
            drain.create_slot(conn, "bench_wire")
            backlog = drain.write_backlog(conn, max(1, rows // drain.TXN_INSERTS))
        events = asyncio.run(capture(dsn, "bench_wire", backlog.changes))
    finally:
        pg.cleanup()
    return events, f"captured from Postgres {binaries.version} through walex"


def synthetic(rows: int) -> tuple[list[Event], str]:
    """Events with the values psycopg loads for the drain benchmark's rows."""
    source = Source(
        database="bench",
        schema="public",
        table="bench_rows",
        columns={
            "id": "bigint",
            "name": "text",
            "qty": "integer",
            "price": "numeric",
            "active": "boolean",
            "created_at": "timestamp with time zone",
            "attrs": "jsonb",
            "ref": "uuid",
        },
        primary_key=("id",),
        replica_identity="full",
        identity_columns=("id", "name", "qty", "price", "active", "created_at", "attrs", "ref"),
        relation_oid=16384,
    )
    start = datetime(2024, 1, 1, tzinfo=UTC)

    def row(i: int) -> dict[str, Any]:
        digest = hashlib.md5(str(i).encode()).hexdigest()
        return {
            "id": i,
            "name": f"c{i}-{digest[:4]}",
            "qty": i % 1000,
            "price": (Decimal(i % 100000) / 7).quantize(CENT, ROUND_HALF_UP),
            "active": i % 3 != 0,
            "created_at": start + timedelta(seconds=i),
            "attrs": {"color": ["red", "green", "blue"][i % 3], "size": i % 50, "tags": ["a", "b"]},
            "ref": UUID(digest),
        }

    events: list[Event] = []
    lsn = 0x16B374D848
    for t in range(max(1, rows // drain.TXN_INSERTS)):
        txn = Transaction(1000 + t, LSN(lsn + 1_000_000), start + timedelta(seconds=t))
        base = t * drain.TXN_INSERTS
        seq = 0
        for half in range(2):
            lo = base + half * 500 + 1
            for i in range(lo, lo + 500):
                events.append(
                    Event("insert", source, row(i), None, frozenset(), LSN(lsn), seq, txn)
                )
                lsn += 200
                seq += 1
            for i in range(lo, lo + 100):
                old = row(i)
                new = {**old, "qty": old["qty"] + 1, "price": old["price"] + CENT * 100}
                events.append(Event("update", source, new, old, frozenset(), LSN(lsn), seq, txn))
                lsn += 200
                seq += 1
            for i in range(lo + 400, lo + 450):
                events.append(
                    Event("delete", source, None, row(i), frozenset(), LSN(lsn), seq, txn)
                )
                lsn += 200
                seq += 1
        lsn += 1_000_000
    return events, "made in Python (the values psycopg loads for the drain benchmark's rows)"


def pure_python(event: Event) -> bytes:
    if not hasattr(wire, "_c_encode"):  # a walex from before the C encoder
        return wire.dumpb(event)
    saved = wire._c_encode
    wire._c_encode = None
    try:
        return wire.dumpb(event)
    finally:
        wire._c_encode = saved


def time_rounds(fn: Callable[[Event], Any], events: list[Event], rounds: int) -> list[float]:
    """Seconds per event of each round."""
    out = []
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        for e in events:
            fn(e)
        out.append((time.perf_counter() - t0) / len(events))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10000, help="inserts (1,300 changes a 1,000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per encoder")
    parser.add_argument("--pg", type=int, default=15, help="Postgres major version")
    parser.add_argument("--synthetic", action="store_true", help="no server: events made here")
    args = parser.parse_args(argv)

    events, origin = synthetic(args.rows) if args.synthetic else from_server(args.rows, args.pg)
    kinds = {k: sum(e.type == k for e in events) for k in ("insert", "update", "delete")}
    print(f"{len(events):,} events {origin}: {kinds}")
    sizes = [len(wire.dumps(e).encode()) for e in events]
    print(f"wire size: {statistics.mean(sizes):.0f} bytes on average")
    print(
        f"python {sys.version.split()[0]}, walex._accel: {_accel.__impl__}, "
        f"orjson {orjson.__version__ if orjson else 'not installed'}; "
        f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )

    c_on = getattr(wire, "_c_encode", None) is not None
    wrong = [e for e in events if wire.dumpb(e) != wire.dumps(e).encode()]
    wrong += [e for e in events if pure_python(e) != wire.dumps(e).encode()]
    if wrong:
        print(f"{len(wrong)} events encoded differently from wire.dumps, e.g. {wrong[0]}")
        return 1
    if c_on:
        fell_back = sum(wire._c_encode(e, wire.encode_value) is None for e in events)
        print(
            f"C encoder: same bytes as wire.dumps(e).encode() for every event; "
            f"{fell_back} left to the Python path"
        )

    def reference(e: Event) -> str:
        return json.dumps(wire.to_dict(e), ensure_ascii=False, separators=(",", ":"))

    runs: list[tuple[str, Callable[[Event], Any]]] = []
    if c_on:
        runs.append(("wire.dumpb, C encoder", wire.dumpb))
    if hasattr(wire, "_c_encode"):
        runs.append(("wire.dumpb, pure Python", pure_python))
    else:
        runs.append(("wire.dumpb (no C encoder in it)", wire.dumpb))
    if orjson is not None:
        runs.append(("orjson.dumps(to_dict(e))", lambda e: orjson.dumps(wire.to_dict(e))))
    runs.append(("json.dumps(to_dict(e)) (reference)", reference))

    print(f"\n{'encoder':<36} {'best µs/event':>14} {'median':>8} {'events/s (best)':>16}")
    best_c = None
    for name, fn in runs:
        per = time_rounds(fn, events, args.rounds)
        best = min(per)
        if best_c is None:
            best_c = best
        ratio = f"  {best / best_c:5.1f}x" if best_c else ""
        print(
            f"{name:<36} {best * 1e6:>14.2f} {statistics.median(per) * 1e6:>8.2f} "
            f"{1 / best:>16,.0f}{ratio}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

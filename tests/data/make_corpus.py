"""Capture pgoutput messages from a real server into tests/data/pgoutput-<major>.jsonl.gz.

Run: python tests/data/make_corpus.py [15|16]

The decoder's unit tests read these bytes, so they test against what Postgres
really sends without needing a server. The SQL below covers every message
type: relations and types, insert/update/delete under each replica identity,
truncate, logical messages, origins, a streamed transaction with a
subtransaction rolled back, an aborted streamed transaction, and two-phase
commits.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import psycopg

from walex.embedded import EmbeddedPostgres, find_binaries

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric, m mood,
                    tags text[], doc jsonb);
CREATE TABLE full_items (id int PRIMARY KEY, body text, n int);
ALTER TABLE full_items REPLICA IDENTITY FULL;
ALTER TABLE full_items ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE toast_items (id int PRIMARY KEY, body text, n int);
ALTER TABLE toast_items ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE nothing_items (id int, v text);
ALTER TABLE nothing_items REPLICA IDENTITY NOTHING;
CREATE TABLE idx_items (a int NOT NULL, b int NOT NULL, v text);
CREATE UNIQUE INDEX idx_items_ab ON idx_items (a, b);
ALTER TABLE idx_items REPLICA IDENTITY USING INDEX idx_items_ab;
CREATE TABLE big (id int PRIMARY KEY, payload text);
CREATE PUBLICATION corpus FOR ALL TABLES;
"""

WORKLOAD = [
    "INSERT INTO items VALUES (1, 'apple', 3, 1.25, 'happy', '{a,b}', '{\"k\": [1, 2]}')",
    "INSERT INTO items VALUES (2, NULL, NULL, 'NaN', NULL, '{}', 'null')",
    "UPDATE items SET qty = 4 WHERE id = 1",
    "UPDATE items SET id = 10 WHERE id = 1",
    "DELETE FROM items WHERE id = 2",
    "INSERT INTO full_items VALUES (1, repeat('x', 10000), 1)",
    "UPDATE full_items SET n = 2 WHERE id = 1",
    "DELETE FROM full_items WHERE id = 1",
    "INSERT INTO toast_items VALUES (1, repeat('y', 10000), 1)",
    "UPDATE toast_items SET n = 2",
    "INSERT INTO nothing_items VALUES (1, 'a')",
    "INSERT INTO idx_items VALUES (1, 2, 'a')",
    "UPDATE idx_items SET v = 'b'",
    "UPDATE idx_items SET a = 5",
    "DELETE FROM idx_items",
    "INSERT INTO big SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 5) g",
    "UPDATE big SET id = id + 100 WHERE id = 1",
    "TRUNCATE items, full_items RESTART IDENTITY CASCADE",
    "SELECT pg_logical_emit_message(true, 'tx-prefix', 'inside')",
    "SELECT pg_logical_emit_message(false, 'plain', '\\x00ff'::bytea)",
    "ALTER TABLE items ADD COLUMN extra text DEFAULT 'e'",
    "INSERT INTO items (id, name) VALUES (3, 'after alter')",
]

# A transaction large enough to be streamed (logical_decoding_work_mem=64kB),
# with a subtransaction rolled back, then one streamed and aborted.
STREAMED = [
    "BEGIN",
    "INSERT INTO big SELECT g, repeat('s', 200) FROM generate_series(1000, 1600) g",
    "SAVEPOINT sp",
    "INSERT INTO big SELECT g, repeat('r', 200) FROM generate_series(2000, 2600) g",
    "ROLLBACK TO SAVEPOINT sp",
    "INSERT INTO big VALUES (3000, 'kept')",
    "COMMIT",
    "BEGIN",
    "INSERT INTO big SELECT g, repeat('a', 200) FROM generate_series(4000, 4600) g",
    "ROLLBACK",
]

TWO_PHASE = [
    "BEGIN",
    "INSERT INTO items (id, name) VALUES (20, 'prepared')",
    "PREPARE TRANSACTION 'gid-commit'",
    "COMMIT PREPARED 'gid-commit'",
    "BEGIN",
    "INSERT INTO items (id, name) VALUES (21, 'rolled back')",
    "PREPARE TRANSACTION 'gid-rollback'",
    "ROLLBACK PREPARED 'gid-rollback'",
    "BEGIN",
    "INSERT INTO big SELECT g, repeat('p', 200) FROM generate_series(5000, 5600) g",
    "PREPARE TRANSACTION 'gid-streamed'",
    "COMMIT PREPARED 'gid-streamed'",
]

ORIGIN = [
    "SELECT pg_replication_origin_create('upstream')",
    "SELECT pg_replication_origin_session_setup('upstream')",
    "BEGIN",
    "SELECT pg_replication_origin_xact_setup('0/ABCDEF', now())",
    "INSERT INTO items (id, name) VALUES (30, 'from upstream')",
    "COMMIT",
    "SELECT pg_replication_origin_session_reset()",
]


def capture(major: int) -> list[dict[str, object]]:
    binaries = {b.major: b for b in find_binaries()}[major]
    out: list[dict[str, object]] = []
    with EmbeddedPostgres(binaries) as pg:
        dsn = pg.create_database("corpus")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SETUP)
            conn.execute("SELECT pg_create_logical_replication_slot('plain', 'pgoutput')")
            conn.execute(
                "SELECT pg_create_logical_replication_slot('twophase', 'pgoutput', false, true)"
            )
            for sql in WORKLOAD + STREAMED + TWO_PHASE + ORIGIN:
                conn.execute(sql)  # type: ignore[arg-type]
            version = {15: "3", 16: "4"}.get(major, "2")
            runs = [
                ("plain", "text", {"messages": "true"}),
                ("plain", "binary", {"messages": "true", "binary": "true"}),
                ("plain", "streaming", {"messages": "true", "streaming": "on"}),
                ("plain", "v1", {"messages": "true", "proto_version": "1"}),
                (
                    "twophase",
                    "two_phase",
                    {"messages": "true", "two_phase": "on", "streaming": "on"},
                ),
            ]
            for slot, name, opts in runs:
                opts = {"proto_version": version, "publication_names": "corpus", **opts}
                args = [x for kv in opts.items() for x in kv]
                rows = conn.execute(
                    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                    f"%s, NULL, NULL{', %s' * len(args)})",  # type: ignore[arg-type]
                    [slot, *args],
                ).fetchall()
                for lsn, data in rows:
                    out.append({"run": name, "options": opts, "lsn": lsn, "hex": bytes(data).hex()})
    return out


def main() -> None:
    major = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    rows = capture(major)
    path = Path(__file__).with_name(f"pgoutput-{major}.jsonl.gz")
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} messages written to {path}")


if __name__ == "__main__":
    main()

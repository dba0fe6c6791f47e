"""``walex doctor`` against a real Postgres: each finding, its fix, the exit code."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from tests.fix_pg import Database
from walex.cli import main


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["doctor", *args, "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    return code, report


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_ready_database_is_all_ok(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    code, report = doctor(capsys, db.dsn, "--publication", pub, "--slot", "not_yet")
    checks = by_name(report)
    assert (code, report["status"]) == (0, "ok"), report
    assert checks["wal_level"]["message"] == "logical"
    assert checks["server version"]["message"].startswith(f"PostgreSQL {db.major}")
    assert checks["max_replication_slots"]["message"].endswith("of 64 free")
    assert "of 64 free" in checks["max_wal_senders"]["message"]
    assert checks["replication right"]["message"] == "role 'postgres' has superuser"
    assert checks[f"publication {pub}"]["message"] == "1 table(s): public.t"
    assert checks["replica identity public.t"]["status"] == "ok"
    assert "creates it" in checks["slot not_yet"]["message"]


def test_text_output_names_status_and_fix(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    assert main(["doctor", db.dsn, "--publication", pub]) == 1
    out = capsys.readouterr().out
    assert "OK   wal_level: logical" in out
    assert "WARN replica identity public.t: DEFAULT: updates carry no old row" in out
    assert '     fix: ALTER TABLE "public"."t" REPLICA IDENTITY FULL;' in out
    assert "1 warning(s), 0 failure(s)" in out


def test_replica_identity_and_missing_publication(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    pub = db.unique("pub")
    db.execute("CREATE TABLE keyed (id int PRIMARY KEY)")
    db.execute("CREATE TABLE nokey (v int)")
    db.execute("CREATE TABLE nothing (id int PRIMARY KEY)")
    db.execute("ALTER TABLE nothing REPLICA IDENTITY NOTHING")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE keyed, nokey, nothing")
    code, report = doctor(capsys, db.dsn, "--publication", pub)
    checks = by_name(report)
    assert code == 2
    assert checks["replica identity public.keyed"]["status"] == "warn"
    assert (
        "deletes carry only the primary key" in checks["replica identity public.keyed"]["message"]
    )
    for table in ("nokey", "nothing"):
        check = checks[f"replica identity public.{table}"]
        assert check["status"] == "fail"
        assert "refuses UPDATE and DELETE" in check["message"]
        assert check["fix"].startswith(f'ALTER TABLE "public"."{table}" REPLICA IDENTITY FULL;')

    code, report = doctor(capsys, db.dsn, "--publication", "nope")
    check = by_name(report)["publication nope"]
    assert (code, check["status"]) == (2, "fail")
    assert check["fix"].startswith('CREATE PUBLICATION "nope" FOR TABLE')


def test_role_without_replication_right(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    role = db.unique("reader")
    db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        dsn = psycopg.conninfo.make_conninfo(db.dsn, user=role)
        code, report = doctor(capsys, dsn)
        check = by_name(report)["replication right"]
        assert (code, check["status"]) == (2, "fail")
        assert check["fix"] == f'ALTER ROLE "{role}" WITH REPLICATION; (as a superuser)'
        # No publication at all is a warning with the command that makes one.
        assert by_name(report)["publications"]["status"] == "warn"
    finally:
        db.execute(f"DROP ROLE {role}")


def test_idle_slot_lag_and_lost_slot(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    idle, lost = db.unique("idle"), db.unique("lost")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [idle])
    db.execute("CREATE TABLE filler (v text)")
    db.execute("INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 2000)")
    code, report = doctor(capsys, db.dsn, "--lag-warn", "100000")
    check = by_name(report)[f"slot {idle}"]
    assert (code, check["status"]) == (1, "warn")
    assert check["message"].startswith("inactive, pgoutput, lag ")
    assert "kB" in check["message"]
    assert "the server keeps that much WAL" in check["message"]
    assert check["fix"] == f"start its consumer, or walex slots DSN drop {idle}"
    keep = by_name(report)["max_slot_wal_keep_size"]
    assert keep["status"] == "warn"
    assert "idle slot can fill" in keep["message"]

    # A slot whose WAL the server removed: wal_status = lost.
    db.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    db.execute("SELECT pg_reload_conf()")
    try:
        db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [lost])
        with db.connect() as conn:
            for _ in range(3):
                conn.execute("INSERT INTO filler VALUES ('y')")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        code, report = doctor(capsys, db.dsn)
    finally:
        db.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        db.execute("SELECT pg_reload_conf()")
    check = by_name(report)[f"slot {lost}"]
    assert (code, check["status"]) == (2, "fail"), report
    assert "wal_status = lost" in check["message"]


def test_unreachable_server_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = doctor(capsys, "postgresql://walex:s3cret@127.0.0.1:1/app?connect_timeout=2")
    assert (code, report["status"]) == (2, "fail")
    check = by_name(report)["connection"]
    assert "could not connect" in check["message"]
    assert "s3cret" not in json.dumps(report)

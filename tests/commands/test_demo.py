"""``walex demo`` end to end, as a new user runs it: a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import psycopg
import pytest

from tests.fix_pg import Database, unique_name
from tests.helpers import wait_for, walex_proc
from walex.cli import main
from walex.embedded import EmbeddedPostgres

# What each scripted step prints, in order: the head line of each event.
EVENTS = [
    r"INSERT (public\.)?\S*user_account .*\n\s+\{id: 1, email: 'ada@example.com', name: 'Ada'",
    r"INSERT (public\.)?\S*user_account .*\n\s+\{id: 2, email: 'grace@example.com'",
    r"INSERT \S*todo .*\n\s+\{id: 1, user_id: 1, title: 'write the docs', done: false",
    r"INSERT \S*todo .*\n\s+\{id: 2, user_id: 1, title: 'ship it'",
    r"INSERT \S*todo .*\n\s+\{id: 3, user_id: 2, title: 'fix the bug'",
    r"UPDATE \S*todo .*\n\s+\{id: 2, .*done: true.*\n\s+done: false -> true\n\s+updated_at: ",
    r"\(filtered out: UPDATE \S*todo changed only updated_at, an unwatched field\)",
    r"UPDATE \S*user_account .*\n.*\n\s+name: 'Ada' -> 'Ada Lovelace'",
    r"DELETE \S*todo .*\n\s+\{id: 1, user_id: 1, title: 'write the docs'",
    r"INSERT \S*todo .*\n\s+\{id: 4, user_id: 2, title: 'celebrate'",
    r"MESSAGE walex\.demo .*\n\s+'todo 4 is for Grace' \(in a transaction\)",
    r"TRUNCATE \S*todo .*\n\s+every row",
    r"done: 11 events shown, 1 filtered out",
]


def assert_in_order(out: str) -> None:
    pos = 0
    for pattern in EVENTS:
        match = re.compile(pattern).search(out, pos)
        assert match, f"{pattern!r} not found in order in:\n{out[pos:]}"
        pos = match.end()


def test_demo_with_nothing_set_up() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "walex", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_in_order(result.stdout)
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
    # The throw-away server is gone with its files.
    removed = re.search(r"stopped Postgres and removed (\S+)", result.stdout)
    assert removed
    assert not os.path.exists(removed.group(1))


def test_demo_on_your_database_then_follow(db: Database) -> None:
    with walex_proc("demo", "--dsn", db.dsn, "--follow") as proc:
        wait_for(proc, "done: 11 events shown", "stdout")
        wait_for(proc, "following: make your own changes", "stdout")
        hint = proc.read_line("stdout").strip()
        wait_for(proc, "Ctrl-C to stop", "stdout")
        # The command the demo prints works as printed.
        subprocess.run(hint, shell=True, check=True, timeout=30, capture_output=True)
        head = wait_for(proc, "INSERT", "stdout")
        record = proc.read_line("stdout")
        assert proc.stop() == 0
        rest = proc.rest("stdout")
        err = proc.rest("stderr")
    assert re.match(r"\s+INSERT walex_demo_[0-9a-f]+\.todo ", head)
    assert "{id: 10, user_id: 1, title: 'mine'" in record
    assert "dropped schema walex_demo_" in rest
    assert "Traceback" not in err
    # Nothing is left in the user's database.
    assert db.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'walex_demo%'") == []
    assert db.fetch("SELECT pubname FROM pg_publication") == []
    deadline = time.monotonic() + 10
    while db.fetch("SELECT 1 FROM pg_replication_slots WHERE database = %s", [db.name]):
        assert time.monotonic() < deadline, "the demo's temporary slot outlived it"
        time.sleep(0.05)


def test_demo_on_a_server_that_cannot_stream_changes_nothing(
    replica_pg: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    name = unique_name("demo_replica")
    dsn = replica_pg.create_database(name)
    try:
        assert main(["demo", "--dsn", dsn]) == 1
        err = capsys.readouterr().err
        assert err.startswith("walex: wal_level is 'replica'"), err
        with psycopg.connect(dsn, autocommit=True) as conn:
            schemas = conn.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'walex_demo%'"
            ).fetchone()
            assert schemas == (0,)
            assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
    finally:
        replica_pg.drop_database(name)

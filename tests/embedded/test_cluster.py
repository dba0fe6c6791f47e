"""walex.embedded.cluster against real Postgres clusters: start, crash, databases, clean up."""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.embedded.helpers import gone
from tests.fix_pg import Database, _server
from walex.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_binaries
from walex.errors import ConfigurationError


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_cluster_is_set_up_for_logical_replication(db: Database) -> None:
    [(version_num, wal_level, work_mem, slots, listen, sync)] = db.fetch(
        "SELECT current_setting('server_version_num')::int, current_setting('wal_level'),"
        " current_setting('logical_decoding_work_mem'), current_setting('max_replication_slots'),"
        " current_setting('listen_addresses'), current_setting('synchronous_commit')"
    )
    assert version_num // 10000 == db.major
    assert wal_level == "logical"
    assert work_mem == "64kB"
    assert slots == "64"
    assert listen == "127.0.0.1"
    assert sync == "on"
    assert db.fetch("SELECT current_database()") == [(db.name,)]


def test_server_runs_as_an_unprivileged_user(pg_server: EmbeddedPostgres) -> None:
    pid = pg_server.pid
    assert pid is not None
    uid = _uid_of(pid)
    assert uid != 0
    assert pg_server.data_dir.stat().st_uid == uid
    if os.geteuid() == 0:
        assert pwd.getpwuid(uid).pw_name in ("postgres", "nobody")
    else:
        assert uid == os.geteuid()


def test_unique_names_do_not_repeat(db: Database) -> None:
    names = {db.unique("Slot-Name") for _ in range(50)}
    assert len(names) == 50
    assert all(name.startswith("slot_name_") and name == name.lower() for name in names)


def test_drop_database_removes_what_pins_it(pg_server: EmbeddedPostgres, db: Database) -> None:
    name = db.unique("dropme")
    dsn = pg_server.create_database(name)
    slot = db.unique("slot")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("PREPARE TRANSACTION 'walex_pinned'")
    # A walsender that streams from the slot keeps it active.
    recvlogical = str(pg_server.binaries.bindir / "pg_recvlogical")
    # --no-loop: exit when the connection is terminated instead of retrying.
    options = ["--no-loop", "-o", "proto_version=1", "-o", "publication_names=none"]
    receiver = subprocess.Popen(
        [recvlogical, "-d", dsn, "--slot", slot, "--start", "-f", "/dev/null", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    idle = psycopg.connect(dsn, autocommit=True)
    try:
        deadline = time.monotonic() + 10
        while not db.fetch(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", [slot]
        ):
            assert receiver.poll() is None, "pg_recvlogical exited"
            assert time.monotonic() < deadline, "the slot never became active"
            time.sleep(0.02)

        pg_server.drop_database(name)

        assert db.fetch("SELECT 1 FROM pg_database WHERE datname = %s", [name]) == []
        assert db.fetch("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [slot]) == []
        assert db.fetch("SELECT 1 FROM pg_prepared_xacts WHERE database = %s", [name]) == []
        assert receiver.wait(timeout=10) != 0
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    finally:
        receiver.kill()
        receiver.wait()
        idle.close()
    pg_server.drop_database(name)  # a database that is gone is no error


def test_create_database_twice_fails(pg_server: EmbeddedPostgres, db: Database) -> None:
    with pytest.raises(EmbeddedPostgresError, match="already exists"):
        pg_server.create_database(db.name)


def test_restart_keeps_data_and_port(db: Database) -> None:
    server = db.server
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute("INSERT INTO t VALUES (1), (2)")
    port, pid = server.port, server.pid

    server.restart()

    assert server.running
    assert server.port == port
    assert server.pid != pid
    assert db.fetch("SELECT id FROM t ORDER BY id") == [(1,), (2,)]


def test_kill_then_start_recovers(db: Database) -> None:
    server = db.server
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute("INSERT INTO t VALUES (1)")
    pid = server.pid
    assert pid is not None

    server.kill()

    assert not server.running
    assert gone(pid)
    with pytest.raises(psycopg.OperationalError):
        db.fetch("SELECT 1")
    server.start()
    assert db.fetch("SELECT id FROM t") == [(1,)]
    log = server.log_file.read_text(errors="replace")
    assert "automatic recovery in progress" in log


def test_a_failed_start_shows_the_server_log(pg_server: EmbeddedPostgres) -> None:
    broken = EmbeddedPostgres(pg_server.binaries, settings={"shared_buffers": "plenty"})
    try:
        with pytest.raises(EmbeddedPostgresError, match="shared_buffers") as failure:
            broken.start()
        assert str(broken.log_file) in str(failure.value)
        assert not broken.running
    finally:
        broken.cleanup()
    assert not broken.base_dir.exists()


def test_context_manager_cleans_up(pg_server: EmbeddedPostgres) -> None:
    with EmbeddedPostgres(pg_server.binaries) as pg:
        pid = pg.pid
        with psycopg.connect(pg.dsn(application_name="walex-test")) as conn:
            assert conn.info.port == pg.port
            assert conn.execute("SELECT current_setting('application_name')").fetchone() == (
                "walex-test",
            )
    assert pid is not None
    assert gone(pid)
    assert not pg.running
    assert not pg.base_dir.exists()


@pytest.mark.parametrize(
    "settings",
    [{"port": "5432"}, {"bad name": "1"}, {"work_mem": "1MB\nfsync = on"}],
    ids=["port", "name", "line-break"],
)
def test_bad_settings_are_refused(settings: dict[str, str]) -> None:
    [binaries, *_] = find_binaries()
    with pytest.raises(ConfigurationError):
        EmbeddedPostgres(binaries, settings=settings)


def test_a_missing_version_fails_with_advice() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"Postgres 99 is not installed.*WALEX_TEST_PG"):
        _server(99)


def test_start_waits_for_a_shutdown_held_up_by_a_replication_client(
    pg_server: EmbeddedPostgres,
) -> None:
    # A logical client that never confirms holds up a fast shutdown until
    # wal_sender_timeout; start() meanwhile must wait, not see "running".
    with EmbeddedPostgres(pg_server.binaries, settings={"wal_sender_timeout": "1s"}) as pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('silent', 'pgoutput')")
        silent = psycopg.pq.PGconn.connect(pg.dsn(replication="database").encode())
        try:
            silent.send_query(
                b"START_REPLICATION SLOT silent LOGICAL 0/0"
                b" (proto_version '1', publication_names 'none')"
            )
            stopper = threading.Thread(target=pg.stop)
            stopper.start()
            deadline = time.monotonic() + 10
            while pg._status() != "stopping":
                assert time.monotonic() < deadline, "the server never began to stop"
                time.sleep(0.01)

            pg.start()

            stopper.join()
            assert pg.running
            with psycopg.connect(pg.dsn()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            silent.finish()

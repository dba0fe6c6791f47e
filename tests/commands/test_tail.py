"""``walex tail`` against a real Postgres, as a user runs it: a subprocess."""

from __future__ import annotations

import contextlib
import json
import shlex
import time

import psycopg
import pytest

from tests.fix_pg import Database
from tests.helpers import Proc, wait_for, walex_proc
from walex.cli import main


def tail(*args: str) -> contextlib.AbstractContextManager[Proc]:
    return walex_proc("tail", *args)


def wait_ready(proc: Proc) -> str:
    """Skip log lines until tail says it streams."""
    return wait_for(proc, "Ctrl-C to stop")


def test_json_lines_then_ctrl_c_leaves_nothing_behind(db: Database) -> None:
    db.execute(
        "CREATE TABLE item (id int PRIMARY KEY, price numeric(8,2), at timestamptz,"
        " tags text[], data bytea)"
    )
    db.execute("ALTER TABLE item REPLICA IDENTITY FULL")
    db.execute("CREATE TABLE other (id int PRIMARY KEY)")
    with tail(db.dsn, "--table", "item", "--format", "json") as proc:
        ready = wait_ready(proc)
        assert "publication walex_tail_" in ready
        assert "temporary slot" in ready
        db.execute("INSERT INTO item VALUES (1, 9.50, '2024-05-01 12:00+00', '{a,b}', '\\x00ff')")
        db.execute("INSERT INTO other VALUES (1)")  # not in the publication
        db.execute("UPDATE item SET price = 10 WHERE id = 1")
        db.execute("DELETE FROM item")
        lines = [json.loads(proc.read_line()) for _ in range(3)]
        # Both the publication and the slot exist while tail runs.
        assert (
            db.fetch("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'walex_tail_%'")[0][0]
            == 1
        )
        assert (
            db.fetch("SELECT count(*) FROM pg_replication_slots WHERE database = %s", [db.name])[0][
                0
            ]
            == 1
        )
        assert proc.stop() == 0
        rest = proc.rest("stdout")
        err = proc.rest("stderr")
    assert rest == ""
    assert "Traceback" not in err
    ins, upd, dele = lines
    assert (ins["type"], ins["schema"], ins["table"]) == ("insert", "public", "item")
    assert ins["new_record"] == {
        "id": 1,
        "price": "9.50",
        "at": "2024-05-01T12:00:00+00:00",
        "tags": ["a", "b"],
        "data": "\\x00ff",
    }
    assert ins["primary_key"] == {"id": 1}
    assert upd["type"] == "update"
    assert upd["changes"] == {"price": ["9.50", "10.00"]}
    assert dele["type"] == "delete"
    assert dele["old_record"]["price"] == "10.00"
    assert all(line["version"] == 1 for line in lines)
    # Nothing leaks: the temporary slot and the publication are gone.
    assert db.fetch("SELECT pubname FROM pg_publication") == []
    deadline = time.monotonic() + 10
    while db.fetch("SELECT slot_name FROM pg_replication_slots WHERE database = %s", [db.name]):
        assert time.monotonic() < deadline, "the temporary slot outlived walex tail"
        time.sleep(0.05)


def test_pretty_with_existing_publication_and_durable_slot(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("tail_slot")
    db.execute("CREATE TABLE a (id int PRIMARY KEY, name text)")
    db.execute("CREATE TABLE b (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE a, b")
    with tail(db.dsn, "--publication", pub, "--slot", slot, "--table", "a") as proc:
        wait_ready(proc)
        db.execute("INSERT INTO b VALUES (1)")  # published, but not asked for
        db.execute("INSERT INTO a VALUES (1, 'ann')")
        db.execute("UPDATE a SET name = 'bob'")
        ((after_update,),) = db.fetch("SELECT pg_current_wal_lsn()")
        db.execute("SELECT pg_logical_emit_message(false, 'note', 'hi')")
        head = proc.read_line()
        body = proc.read_line()
        upd_head = proc.read_line()
        upd_body = proc.read_line()
        upd_note = proc.read_line()
        msg_head = proc.read_line()
        msg_body = proc.read_line()
        assert proc.stop() == 0
    assert head.startswith("INSERT public.a ")
    assert body.strip() == "{id: 1, name: 'ann'}"
    assert upd_head.startswith("UPDATE public.a ")
    assert upd_body.strip() == "{id: 1, name: 'bob'}"
    assert "REPLICA IDENTITY is not FULL" in upd_note
    assert msg_head.startswith("MESSAGE note ")
    assert msg_body.strip() == "'hi' (outside a transaction)"
    # A named slot is durable: it stays, at the position tail confirmed.
    rows = db.fetch(
        "SELECT temporary, confirmed_flush_lsn >= %s::pg_lsn"
        " FROM pg_replication_slots WHERE slot_name = %s",
        [after_update, slot],
    )
    assert rows == [(False, True)]
    # The publication was the user's: it stays too.
    assert db.fetch("SELECT count(*) FROM pg_publication WHERE pubname = %s", [pub]) == [(1,)]


def test_table_names_in_the_grammar_with_an_existing_publication(db: Database) -> None:
    # A schema with a dot in its name, as docs/filters.md writes it; the
    # publication also has a table of the same name elsewhere, not asked for.
    pub = db.unique("pub")
    db.execute('CREATE SCHEMA "my.schema"')
    db.execute('CREATE TABLE "my.schema"."t" (id int PRIMARY KEY)')
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f'CREATE PUBLICATION {pub} FOR TABLE "my.schema"."t", public.t')
    args = ["--publication", pub, "--table", '"my.schema"."t"', "--format", "json"]
    with tail(db.dsn, *args) as proc:
        wait_ready(proc)
        db.execute("INSERT INTO t VALUES (1)")  # published, but not asked for
        db.execute('INSERT INTO "my.schema"."t" VALUES (2)')
        line = json.loads(proc.read_line())
        assert proc.stop() == 0
        assert proc.rest("stdout") == ""
    assert (line["schema"], line["table"], line["new_record"]) == ("my.schema", "t", {"id": 2})


def test_errors_are_one_line_with_the_fix(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", db.dsn, "--table", "nope"]) == 2  # configuration
    err = capsys.readouterr().err
    assert err.startswith("walex: table 'nope' does not exist")
    assert err.count("\n") == 1
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    assert main(["tail", db.dsn, "--publication", "missing_pub"]) == 1
    err = capsys.readouterr().err
    assert "publication 'missing_pub' does not exist" in err
    assert "CREATE PUBLICATION" in err


def test_without_superuser_all_tables_is_refused_with_the_way_out(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    role = db.unique("tailer")
    db.execute(f"CREATE ROLE {role} LOGIN REPLICATION")
    try:
        dsn = psycopg.conninfo.make_conninfo(db.dsn, user=role)
        assert main(["tail", dsn]) == 1
        err = capsys.readouterr().err
        assert err.startswith("walex: could not create a publication (FOR ALL TABLES needs a")
        assert "pass --table, or create one and pass --publication" in err
    finally:
        db.execute(f"DROP ROLE {role}")
    # A durable slot needs a publication that outlives the run.
    assert main(["tail", db.dsn, "--slot", "kept", "--table", "t"]) == 2
    assert "--slot needs --publication" in capsys.readouterr().err
    assert db.fetch("SELECT pubname FROM pg_publication") == []


def test_publication_is_dropped_even_if_its_connection_was_cut(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    with tail(db.dsn, "--table", "t", "--format", "json") as proc:
        wait_ready(proc)
        # An idle connection cut by the server, a proxy or idle_session_timeout.
        cut = db.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'walex-tail'",
            [db.name],
        )
        assert cut
        db.execute("INSERT INTO t VALUES (1)")
        line = proc.read_line()
        assert json.loads(line)["new_record"] == {"id": 1}, proc.rest("stderr")
        assert proc.stop() == 0
    assert db.fetch("SELECT pubname FROM pg_publication") == []


def test_a_table_outside_the_publication_is_refused_with_the_fix(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    db.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    db.execute("CREATE TABLE product (id int PRIMARY KEY)")
    pub = db.unique("events")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE orders")
    assert main(["tail", db.dsn, "-p", pub, "--table", "product"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"walex: public.product is not in publication '{pub}'"), err
    fix = shlex.join(["walex", "setup", db.dsn, "--publication", pub, "--table", "public.product"])
    assert fix in err
    assert err.count("\n") == 1

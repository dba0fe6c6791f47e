"""``walex setup`` against a real Postgres: only what is missing, quoted, idempotent."""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_pg import Database, unique_name
from walex.cli import main
from walex.embedded import EmbeddedPostgres


def test_dry_run_prints_sql_and_changes_nothing(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    slot = db.unique("setup_slot")
    db.execute('CREATE TABLE "Odd Table" (id int PRIMARY KEY)')
    db.execute("CREATE SCHEMA billing")
    db.execute("CREATE TABLE billing.invoice (id int PRIMARY KEY)")
    args = [
        "setup",
        db.dsn,
        "--publication",
        'my "pub"',
        "-t",
        "Odd Table",
        "-t",
        "billing.invoice",
    ]
    code = main([*args, "--replica-identity", "full", "--slot", slot, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines() == [
        'CREATE PUBLICATION "my ""pub""" FOR TABLE "public"."Odd Table", "billing"."invoice";',
        'ALTER TABLE "public"."Odd Table" REPLICA IDENTITY FULL;',
        'ALTER TABLE "billing"."invoice" REPLICA IDENTITY FULL;',
        f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');",
    ]
    assert db.fetch("SELECT pubname FROM pg_publication") == []
    assert db.fetch("SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s", [slot]) == []
    assert db.fetch("SELECT relreplident FROM pg_class WHERE relname = 'invoice'") == [("d",)]


def test_creates_what_is_missing_and_is_idempotent(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    pub, slot = db.unique("pub"), db.unique("setup_slot")
    db.execute("CREATE TABLE a (id int PRIMARY KEY)")
    db.execute("CREATE TABLE b (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE a")
    db.execute("ALTER TABLE a REPLICA IDENTITY FULL")
    args = [
        "setup",
        db.dsn,
        "-p",
        pub,
        "--table",
        "a",
        "--table",
        "b",
        "--replica-identity",
        "full",
    ]
    assert main([*args, "--slot", slot]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f'ALTER PUBLICATION "{pub}" ADD TABLE "public"."b";',
        'ALTER TABLE "public"."b" REPLICA IDENTITY FULL;',
        f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');",
    ]
    assert sorted(db.fetch("SELECT tablename FROM pg_publication_tables")) == [("a",), ("b",)]
    assert db.fetch("SELECT relreplident FROM pg_class WHERE relname = 'b'") == [("f",)]
    assert db.fetch(
        "SELECT plugin, temporary FROM pg_replication_slots WHERE slot_name = %s", [slot]
    ) == [("pgoutput", False)]
    assert main([*args, "--slot", slot]) == 0
    assert capsys.readouterr().out == "nothing to do: everything is in place\n"
    # Back to DEFAULT is a change too.
    assert main(["setup", db.dsn, "-p", pub, "--table", "b", "--replica-identity", "default"]) == 0
    assert capsys.readouterr().out == 'ALTER TABLE "public"."b" REPLICA IDENTITY DEFAULT;\n'


def test_no_tables_means_all_tables(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    pub = db.unique("pub")
    assert main(["setup", db.dsn, "--publication", pub]) == 0
    assert capsys.readouterr().out == f'CREATE PUBLICATION "{pub}" FOR ALL TABLES;\n'
    assert db.fetch("SELECT puballtables FROM pg_publication WHERE pubname = %s", [pub]) == [
        (True,)
    ]


def test_errors_name_the_problem(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["setup", db.dsn, "-p", "p", "--table", "missing"]) == 2  # configuration
    err = capsys.readouterr().err
    assert err.startswith("walex: table 'missing' does not exist")
    assert main(["setup", db.dsn, "-p", "p", "--slot", "Bad-Name"]) == 2
    assert "slot name 'Bad-Name' is not valid" in capsys.readouterr().err
    assert db.fetch("SELECT pubname FROM pg_publication") == []


def test_tables_are_read_with_the_name_grammar(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    # The grammar the app and docs/filters.md use: quotes keep dots, double
    # quotes and capitals.
    db.execute('CREATE SCHEMA "my.schema"')
    db.execute('CREATE TABLE "my.schema"."t" (id int PRIMARY KEY)')
    db.execute("CREATE SCHEMA app")
    db.execute('CREATE TABLE app."odd""t" (id int PRIMARY KEY)')
    db.execute('CREATE SCHEMA "Billing"')
    db.execute('CREATE TABLE "Billing"."Invoice" (id int PRIMARY KEY)')
    pub = db.unique("pub")
    tables = ["-t", '"my.schema"."t"', "-t", 'app."odd""t"', "-t", '"Billing"."Invoice"']
    assert main(["setup", db.dsn, "-p", pub, *tables]) == 0
    assert capsys.readouterr().out == (
        f'CREATE PUBLICATION "{pub}" FOR TABLE "my.schema"."t", "app"."odd""t", '
        '"Billing"."Invoice";\n'
    )
    assert sorted(
        db.fetch(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", [pub]
        )
    ) == [("Billing", "Invoice"), ("app", 'odd"t'), ("my.schema", "t")]
    # The comma list of earlier versions still works (commas inside quotes are kept).
    listed = '"my.schema"."t",app."odd""t","Billing"."Invoice"'
    assert main(["setup", db.dsn, "-p", pub, "--tables", listed]) == 0
    assert capsys.readouterr().out == "nothing to do: everything is in place\n"


def test_a_pattern_is_refused(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    db.execute("CREATE TABLE order_a (id int PRIMARY KEY)")
    assert main(["setup", db.dsn, "-p", "p", "--table", "order_*"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("walex: 'order_*' is a pattern; name one table"), err
    assert db.fetch("SELECT pubname FROM pg_publication") == []


def test_a_failing_precondition_changes_nothing(
    replica_pg: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    """wal_level=replica: the slot would fail, so the publication is not made either."""
    name = unique_name("setup_replica")
    dsn = replica_pg.create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        args = ["setup", dsn, "-p", "events", "-t", "t", "--replica-identity", "full"]
        assert main([*args, "--slot", "orders"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("walex: nothing was changed: wal_level is 'replica'"), err
        assert err.count("\n") == 1
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
            assert conn.execute(
                "SELECT relreplident FROM pg_class WHERE relname = 't'"
            ).fetchone() == ("d",)
        # Without the slot, the rest can run.
        assert main(args) == 0
    finally:
        replica_pg.drop_database(name)


def test_rights_are_checked_before_anything_runs(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    role = db.unique("setup_role")
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(f"GRANT CREATE ON DATABASE {db.name} TO {role}")
    try:
        dsn = psycopg.conninfo.make_conninfo(db.dsn, user=role)
        assert main(["setup", dsn, "-p", "events", "-t", "t", "--slot", "s_rights"]) == 1
        err = capsys.readouterr().err
        assert f"the role '{role}' does not own public.t" in err
        assert f'ALTER ROLE "{role}" WITH REPLICATION' in err
        assert db.fetch("SELECT count(*) FROM pg_publication") == [(0,)]
        assert db.fetch(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 's_rights'"
        ) == [(0,)]
    finally:
        db.execute(f"REVOKE CREATE ON DATABASE {db.name} FROM {role}")
        db.execute(f"DROP ROLE {role}")

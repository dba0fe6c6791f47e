"""``walex setup`` against a real Postgres: only what is missing, quoted, idempotent."""

from __future__ import annotations

import pytest

from tests.fix_pg import Database
from walex.cli import main


def test_dry_run_prints_sql_and_changes_nothing(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    slot = db.unique("setup_slot")
    db.execute('CREATE TABLE "Odd Table" (id int PRIMARY KEY)')
    db.execute("CREATE SCHEMA billing")
    db.execute("CREATE TABLE billing.invoice (id int PRIMARY KEY)")
    args = ["setup", db.dsn, "--publication", 'my "pub"', "--tables", "Odd Table,billing.invoice"]
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
    args = ["setup", db.dsn, "-p", pub, "--tables", "a, b", "--replica-identity", "full"]
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
    assert main(["setup", db.dsn, "-p", pub, "--tables", "b", "--replica-identity", "default"]) == 0
    assert capsys.readouterr().out == 'ALTER TABLE "public"."b" REPLICA IDENTITY DEFAULT;\n'


def test_no_tables_means_all_tables(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    pub = db.unique("pub")
    assert main(["setup", db.dsn, "--publication", pub]) == 0
    assert capsys.readouterr().out == f'CREATE PUBLICATION "{pub}" FOR ALL TABLES;\n'
    assert db.fetch("SELECT puballtables FROM pg_publication WHERE pubname = %s", [pub]) == [
        (True,)
    ]


def test_errors_name_the_problem(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["setup", db.dsn, "-p", "p", "--tables", "missing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("walex: table 'missing' does not exist")
    assert main(["setup", db.dsn, "-p", "p", "--slot", "Bad-Name"]) == 1
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
    tables = '"my.schema"."t",app."odd""t","Billing"."Invoice"'
    assert main(["setup", db.dsn, "-p", pub, "--tables", tables]) == 0
    assert capsys.readouterr().out == (
        f'CREATE PUBLICATION "{pub}" FOR TABLE "my.schema"."t", "app"."odd""t", '
        '"Billing"."Invoice";\n'
    )
    assert sorted(
        db.fetch(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", [pub]
        )
    ) == [("Billing", "Invoice"), ("app", 'odd"t'), ("my.schema", "t")]
    assert main(["setup", db.dsn, "-p", pub, "--tables", tables]) == 0
    assert capsys.readouterr().out == "nothing to do: everything is in place\n"


def test_a_pattern_is_refused(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    db.execute("CREATE TABLE order_a (id int PRIMARY KEY)")
    assert main(["setup", db.dsn, "-p", "p", "--tables", "order_*"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("walex: 'order_*' is a pattern; name one table"), err
    assert db.fetch("SELECT pubname FROM pg_publication") == []

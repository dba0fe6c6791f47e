"""``walex.admin.setup``: table lookup with the one name grammar, and the set-up plan."""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_pg import Database
from walex.admin import connect_sql, find_tables, setup_plan
from walex.errors import ConfigurationError


def _odd_tables(db: Database) -> None:
    """Tables whose names need the grammar: a dot, a double quote, capitals, a space."""
    db.execute('CREATE SCHEMA "my.schema"')
    db.execute('CREATE TABLE "my.schema"."t" (id int PRIMARY KEY)')
    db.execute("CREATE SCHEMA app")
    db.execute('CREATE TABLE app."odd""t" (id int)')
    db.execute('CREATE SCHEMA "Billing"')
    db.execute('CREATE TABLE "Billing"."Invoice" (id int PRIMARY KEY)')
    db.execute('CREATE TABLE "Odd Table" (id int PRIMARY KEY)')


@pytest.mark.parametrize(
    ("written", "schema", "table"),
    [
        ('"my.schema"."t"', "my.schema", "t"),
        ('"my.schema".t', "my.schema", "t"),
        ('app."odd""t"', "app", 'odd"t'),
        ('app:"odd""t"', "app", 'odd"t'),
        ('"Billing"."Invoice"', "Billing", "Invoice"),
        ("Billing.Invoice", "Billing", "Invoice"),
        ("Odd Table", "public", "Odd Table"),
        ('"Odd Table"', "public", "Odd Table"),
        ("public.Odd Table", "public", "Odd Table"),
    ],
)
async def test_find_tables_reads_the_name_grammar(
    db: Database, written: str, schema: str, table: str
) -> None:
    _odd_tables(db)
    conn = await connect_sql(db.dsn)
    try:
        [ref] = await find_tables(conn, [written])
    finally:
        await conn.close()
    assert (ref.schema, ref.name) == (schema, table)
    assert ref.oid == db.fetch("SELECT %s::regclass::oid", [ref.identifier.as_string()])[0][0]


async def test_find_tables_goes_through_the_search_path(db: Database) -> None:
    db.execute("CREATE SCHEMA app")
    db.execute("CREATE TABLE app.orders (id int PRIMARY KEY)")
    dsn = psycopg.conninfo.make_conninfo(db.dsn, options="-c search_path=app")
    conn = await connect_sql(dsn)
    try:
        [ref] = await find_tables(conn, ["orders"])
    finally:
        await conn.close()
    assert (ref.schema, ref.name, ref.has_primary_key) == ("app", "orders", True)
    assert ref.replica_identity == "default"


@pytest.mark.parametrize(
    ("written", "says"),
    [
        ("order_*", "'order_*' is a pattern"),
        ("app.*", "'app.*' is a pattern"),
        ("*", "'*' is a pattern"),
        ('"my.schema', "unbalanced double quote"),
        ("a.b.c", "more than one dot"),
        ("app.", "empty name"),
        ('""', "is not a table name"),
        ("  ", "non-empty"),
    ],
)
async def test_find_tables_refuses_what_is_not_one_table(
    db: Database, written: str, says: str
) -> None:
    db.execute('CREATE TABLE "order_*" (id int)')  # a pattern is not read as a name
    conn = await connect_sql(db.dsn)
    try:
        with pytest.raises(ConfigurationError) as info:
            await find_tables(conn, [written])
    finally:
        await conn.close()
    assert says in str(info.value)


async def test_a_quoted_wildcard_is_a_plain_character(db: Database) -> None:
    db.execute('CREATE TABLE "order_*" (id int)')
    conn = await connect_sql(db.dsn)
    try:
        [ref] = await find_tables(conn, ['"order_*"'])
    finally:
        await conn.close()
    assert (ref.schema, ref.name) == ("public", "order_*")


async def test_a_missing_table_names_the_database(db: Database) -> None:
    conn = await connect_sql(db.dsn)
    try:
        with pytest.raises(ConfigurationError) as info:
            await find_tables(conn, ['"my.schema"."t"'])
    finally:
        await conn.close()
    assert str(info.value).startswith('table \'"my.schema"."t"\' does not exist')
    assert db.name in str(info.value)


async def test_setup_plan_quotes_every_name(db: Database) -> None:
    _odd_tables(db)
    conn = await connect_sql(db.dsn)
    try:
        plan = await setup_plan(
            conn,
            publication='x" FOR ALL TABLES; --',
            tables=['"my.schema"."t"', 'app."odd""t"', '"Billing"."Invoice"'],
            replica_identity="full",
            slot="s1",
        )
        text = [statement.as_string(conn) for statement in plan]
    finally:
        await conn.close()
    assert text == [
        'CREATE PUBLICATION "x"" FOR ALL TABLES; --" FOR TABLE "my.schema"."t", '
        '"app"."odd""t", "Billing"."Invoice"',
        'ALTER TABLE "my.schema"."t" REPLICA IDENTITY FULL',
        'ALTER TABLE "app"."odd""t" REPLICA IDENTITY FULL',
        'ALTER TABLE "Billing"."Invoice" REPLICA IDENTITY FULL',
        "SELECT pg_create_logical_replication_slot('s1', 'pgoutput')",
    ]

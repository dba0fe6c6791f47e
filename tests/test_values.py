"""Column values end to end: every type arrives as psycopg would load it.

For each type, the value in a walex event must equal what a ``SELECT`` of
the same row returns through an ordinary psycopg connection, in walex's text
mode and in its binary mode (``binary=True``) alike: the wire format is a
transport option and must not change the Python values a user gets.

The reference ``SELECT`` always runs in psycopg's default (text) result
format. psycopg's text and binary loaders agree for every type it has a
binary loader for; for a type psycopg has no loader for, the text ``SELECT``
gives the value's text, which is what walex promises for such types
(DESIGN.md: "A type that nothing knows arrives as its text").

Where walex makes a choice that a plain ``SELECT`` does not, the reference
connection is given the same registrations (see :func:`_reference`): enums as
their label (a ``str``), domains as their base type, composites through
``CompositeInfo``/``register_composite``, hstore through ``register_hstore``.
"""

from __future__ import annotations

import json
import math
import os
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.hstore import register_hstore
from psycopg.types.numeric import IntLoader
from psycopg.types.string import TextLoader

import walex
from tests.fix_pg import Database
from tests.helpers import TYPE_MATRIX as COLUMNS
from tests.helpers import USER_TYPES
from tests.streams import collect

MODES = [pytest.param(False, id="text"), pytest.param(True, id="binary")]


def _same(got: Any, want: Any) -> bool:
    """Equal, and of the same type, all the way down; NaN equals NaN."""
    if isinstance(got, float) and isinstance(want, float) and math.isnan(got):
        return math.isnan(want)
    if isinstance(got, Decimal) and isinstance(want, Decimal) and got.is_nan():
        return want.is_nan()
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(map(_same, got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in got)
    if hasattr(got, "_fields") and hasattr(want, "_fields"):
        # Composites: each connection makes its own namedtuple class for the
        # type; compare the type's name, the fields and the values.
        return (
            type(got).__name__ == type(want).__name__
            and got._fields == want._fields
            and all(map(_same, got, want))
        )
    return type(got) is type(want) and got == want


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _mismatches(got: dict[str, Any], want: dict[str, Any], types: dict[str, str]) -> list[str]:
    """One line per column whose value differs (or is missing)."""
    lines = []
    for name, value in want.items():
        if name not in got:
            lines.append(f"{name} ({types.get(name, '?')}): missing from the record")
        elif not _same(got[name], value):
            lines.append(
                f"{name} ({types.get(name, '?')}): walex {_short(got[name])}"
                f" != SELECT {_short(value)}"
            )
    lines.extend(f"{name}: not in the table" for name in got.keys() - want.keys())
    return lines


def _reference(
    db: Database,
    *,
    mood: bool = False,
    posint: bool = False,
    pair: bool = False,
    hstore: bool = False,
) -> psycopg.Connection[Any]:
    """A plain psycopg connection, with the types registered as walex does."""
    conn = db.connect()
    if mood:
        # walex loads an enum as its label (str), not as a Python Enum.
        info = TypeInfo.fetch(conn, "mood")
        assert info is not None
        info.register(conn)  # and mood[] as a list
        conn.adapters.register_loader(info.oid, TextLoader)
    if posint:
        # A SELECT reports a domain column with its base type already; the
        # domain's own OID is seen in its arrays (posint[]), and in composite
        # fields. walex loads it with the base type's loader.
        info = TypeInfo.fetch(conn, "posint")
        assert info is not None
        info.register(conn)
        conn.adapters.register_loader(info.oid, IntLoader)
    if pair:
        cinfo = CompositeInfo.fetch(conn, "pair")
        assert cinfo is not None
        register_composite(cinfo, conn)
    if hstore:
        hinfo = TypeInfo.fetch(conn, "hstore")
        assert hinfo is not None
        register_hstore(hinfo, conn)
    return conn


def _select(conn: psycopg.Connection[Any], table: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT * FROM {table} ORDER BY id")
    names = [col.name for col in cur.description or ()]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


async def _capture(
    db: Database, table: str, statements: list[str], count: int, binary: bool
) -> list[walex.Event]:
    """Publish *table*, run *statements* while streaming, return *count* events."""
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE {table}")
    async with walex.connect(db.dsn, publication=pub, binary=binary) as stream:
        with db.connect() as conn:
            for statement in statements:
                conn.execute(statement)
        return await collect(stream, count, 20.0)


@pytest.mark.parametrize("binary", MODES)
async def test_every_type_matches_select(db: Database, binary: bool) -> None:
    for ddl in USER_TYPES:
        db.execute(ddl)
    types = {name: sql_type for name, sql_type, _ in COLUMNS}
    db.execute(
        "CREATE TABLE matrix (id int PRIMARY KEY, "
        + ", ".join(f"{name} {sql_type}" for name, sql_type, _ in COLUMNS)
        + ")"
    )
    insert = (
        "INSERT INTO matrix (id, "
        + ", ".join(name for name, _, _ in COLUMNS)
        + ") VALUES (1, "
        + ", ".join(literal for _, _, literal in COLUMNS)
        + "), (2, "
        + ", ".join("NULL" for _ in COLUMNS)
        + ")"
    )
    full, nulls = await _capture(db, "matrix", [insert], 2, binary)
    with _reference(db, mood=True, posint=True, pair=True) as conn:
        want_full, want_nulls = _select(conn, "matrix")

    assert (full.type, nulls.type) == ("insert", "insert")
    assert full.new_record is not None
    assert nulls.new_record is not None
    problems = _mismatches(full.new_record, want_full, types)
    assert not problems, (
        f"{len(problems)} of {len(COLUMNS)} types differ from a SELECT "
        f"({'binary' if binary else 'text'} mode):\n" + "\n".join(problems)
    )
    # A NULL is a None in every column, and no column is left out.
    assert want_nulls == {"id": 2, **dict.fromkeys(types)}
    assert nulls.new_record == want_nulls


@pytest.mark.parametrize("binary", MODES)
async def test_infinite_dates_and_timestamps_do_not_break_the_stream(
    db: Database, binary: bool
) -> None:
    # Python's date and datetime have no infinity: psycopg's loaders raise
    # DataError ("date too large (after year 10K)") on 'infinity', so a plain
    # SELECT of these rows fails. walex must not crash the stream on them: it
    # delivers the value's text, and the finite values next to it as usual.
    db.execute(
        "CREATE TABLE inf (id int PRIMARY KEY, d date, ts timestamp, tstz timestamptz,"
        " ok date, d_arr date[])"
    )
    with db.connect() as conn, pytest.raises(psycopg.DataError):
        conn.execute("SELECT 'infinity'::date").fetchone()
    events = await _capture(
        db,
        "inf",
        [
            "INSERT INTO inf VALUES (1, 'infinity', '-infinity', 'infinity', '2024-02-29',"
            " '{infinity,2024-01-01,-infinity}')",
            "INSERT INTO inf VALUES (2, '-infinity', 'infinity', '-infinity', NULL, NULL)",
            "INSERT INTO inf VALUES (3, '2024-01-01', '2024-01-01 10:00', NULL, NULL, NULL)",
        ],
        3,
        binary,
    )
    assert [e.new_record for e in events] == [
        {
            "id": 1,
            "d": "infinity",
            "ts": "-infinity",
            "tstz": "infinity",
            "ok": date(2024, 2, 29),
            "d_arr": ["infinity", date(2024, 1, 1), "-infinity"],
        },
        {
            "id": 2,
            "d": "-infinity",
            "ts": "infinity",
            "tstz": "-infinity",
            "ok": None,
            "d_arr": None,
        },
        {
            "id": 3,
            "d": date(2024, 1, 1),
            "ts": datetime(2024, 1, 1, 10, 0),
            "tstz": None,
            "ok": None,
            "d_arr": None,
        },
    ]


@pytest.mark.parametrize("binary", MODES)
async def test_json_numbers_match_select(db: Database, binary: bool) -> None:
    # psycopg loads json with the standard library: integers of any size stay
    # exact, and a json (not jsonb) number beyond a double's range is inf.
    # walex must give the same values, whichever JSON parser it uses.
    db.execute("CREATE TABLE js (id int PRIMARY KEY, jb jsonb, j json)")
    statements = [
        """INSERT INTO js VALUES (1, '{"big": 12345678901234567890123,"""
        """ "neg": -9223372036854775809, "u64": 18446744073709551615, "dec": 0.1}',"""
        """ '{"big": 123456789012345678901234567890}')""",
        # jsonb stores 1e400 as an exact numeric (a 401-digit integer); json
        # keeps the text, which the standard library reads as inf.
        "INSERT INTO js VALUES (2, '[1e400, 1.5]', '[1e400]')",
    ]
    events = await _capture(db, "js", statements, 2, binary)
    with _reference(db) as conn:
        want = _select(conn, "js")
    assert want[0]["jb"]["big"] == 12345678901234567890123
    assert want[1]["jb"][0] == 10**400
    assert want[1]["j"] == [math.inf]
    problems = [
        line
        for event, row in zip(events, want, strict=True)
        for line in _mismatches(event.new_record or {}, row, {"jb": "jsonb", "j": "json"})
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("binary", MODES)
async def test_one_megabyte_text_arrives_intact(db: Database, binary: bool) -> None:
    db.execute("CREATE TABLE big (id int PRIMARY KEY, body text, blob bytea)")
    body = os.urandom(512 * 1024).hex() + "\u00e9\u2713"  # 1 MiB of text, and some non-ASCII
    blob = os.urandom(1024 * 1024)
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE big")
    async with walex.connect(db.dsn, publication=pub, binary=binary) as stream:
        db.execute("INSERT INTO big VALUES (1, %s, %s)", (body, blob))
        (event,) = await collect(stream, 1)
    record = event.new_record
    assert record is not None
    assert len(record["body"]) == len(body)
    assert record["body"] == body
    assert type(record["blob"]) is bytes
    assert record["blob"] == blob


def _extension_available(db: Database, name: str) -> bool:
    rows = db.fetch("SELECT 1 FROM pg_available_extensions WHERE name = %s", (name,))
    return bool(rows)


@pytest.mark.parametrize("binary", MODES)
async def test_type_without_a_loader_arrives_as_text(db: Database, binary: bool) -> None:
    # aclitem: psycopg has no loader for it and it has no binary send
    # function, so the server sends its text even in binary mode. The record
    # holds that text (a str), and the column is never dropped, NULL or not.
    columns = {"acl": "aclitem"}
    values = {"acl": "'postgres=r/postgres'"}
    if not binary:
        # An array of aclitem cannot be sent in binary mode at all: the server
        # fails with "no binary output function available for type aclitem".
        columns["acl_arr"] = "aclitem[]"
        values["acl_arr"] = "'{postgres=r/postgres,=w/postgres}'"
    if _extension_available(db, "citext"):
        # An extension type: walex finds it in the catalog, knows no loader,
        # and keeps its text. (Postgres 15 of the system ships contrib; the
        # pgserver build of 16 does not.)
        db.execute("CREATE EXTENSION citext")
        columns["ci"] = "citext"
        values["ci"] = "'HeLLo'"
        columns["ci_arr"] = "citext[]"
        values["ci_arr"] = "'{A,b}'"
    db.execute(
        "CREATE TABLE odd (id int PRIMARY KEY, "
        + ", ".join(f"{name} {sql_type}" for name, sql_type in columns.items())
        + ")"
    )
    insert = (
        "INSERT INTO odd VALUES (1, "
        + ", ".join(values.values())
        + "), (2, "
        + ", ".join("NULL" for _ in values)
        + ")"
    )
    full, nulls = await _capture(db, "odd", [insert], 2, binary)
    with _reference(db) as conn:
        want_full, want_nulls = _select(conn, "odd")
    assert want_full["acl"] == "postgres=r/postgres"
    assert full.new_record is not None
    assert nulls.new_record is not None
    problems = _mismatches(full.new_record, want_full, columns)
    assert not problems, "\n".join(problems)
    for name, value in full.new_record.items():
        if name != "id":
            assert isinstance(value, str | list), (name, value)
    assert nulls.new_record == want_nulls == {"id": 2, **dict.fromkeys(columns)}
    assert full.source is not None
    assert {k: v for k, v in full.source.columns.items() if k != "id"} == columns


@pytest.mark.parametrize("binary", MODES)
async def test_hstore_matches_select(db: Database, binary: bool) -> None:
    if not _extension_available(db, "hstore"):
        pytest.skip(
            f"the hstore extension is not installed in this Postgres {db.major} build"
            " (the pgserver build ships no contrib modules)"
        )
    db.execute("CREATE EXTENSION hstore")
    db.execute("CREATE TABLE hs (id int PRIMARY KEY, h hstore, h_arr hstore[])")
    insert = (
        """INSERT INTO hs VALUES (1, 'a=>1, "b c"=>NULL, "q\\"uote"=>"x,y"',"""
        """ ARRAY['x=>y'::hstore, ''::hstore, NULL]), (2, NULL, NULL)"""
    )
    events = await _capture(db, "hs", [insert], 2, binary)
    with _reference(db, hstore=True) as conn:
        want = _select(conn, "hs")
    assert want[0]["h"] == {"a": "1", "b c": None, 'q"uote': "x,y"}
    problems = [
        line
        for event, row in zip(events, want, strict=True)
        for line in _mismatches(event.new_record or {}, row, {"h": "hstore", "h_arr": "hstore[]"})
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("binary", MODES)
async def test_xml_matches_select(db: Database, binary: bool) -> None:
    try:
        db.execute("SELECT '<a/>'::xml")
    except psycopg.errors.FeatureNotSupported:
        pytest.skip(f"this Postgres {db.major} build has no libxml: no xml values at all")
    db.execute("CREATE TABLE x (id int PRIMARY KEY, doc xml, docs xml[])")
    insert = """INSERT INTO x VALUES (1, '<a b="1">t\u00e9xt</a>', ARRAY['<b/>'::xml, NULL])"""
    (event,) = await _capture(db, "x", [insert], 1, binary)
    with _reference(db) as conn:
        (want,) = _select(conn, "x")
    assert want["doc"] == '<a b="1">t\u00e9xt</a>'
    problems = _mismatches(event.new_record or {}, want, {"doc": "xml", "docs": "xml[]"})
    assert not problems, "\n".join(problems)


async def test_source_names_the_types(db: Database) -> None:
    for ddl in USER_TYPES:
        db.execute(ddl)
    db.execute("CREATE SCHEMA other")
    db.execute("CREATE TYPE other.color AS ENUM ('red')")
    columns = {
        "id": "integer",
        "a": "text[]",
        "b": "integer[]",  # declared integer[][]: Postgres keeps no dimensions
        "c": "mood",
        "d": "mood[]",
        "e": "posint",
        "f": "posint[]",
        "g": "pair",
        "h": "pair[]",
        "i": "character(5)",
        "j": "character varying(10)",
        "k": "numeric(10,2)",
        "l": "bit(4)",
        "m": "timestamp with time zone",
        "n": "timestamp(3) without time zone",
        "o": "int4multirange",
        "p": "other.color",
        "q": "jsonb",
    }
    declared = {**columns, "id": "integer PRIMARY KEY", "b": "integer[][]"}
    db.execute(
        "CREATE TABLE named ("
        + ", ".join(f"{name} {sql_type}" for name, sql_type in declared.items())
        + ")"
    )
    (event,) = await _capture(
        db, "named", ["INSERT INTO named (id, p) VALUES (1, 'red')"], 1, False
    )
    assert event.source is not None
    assert dict(event.source.columns) == columns
    assert list(event.source.columns) == list(columns)  # in the table's order
    assert event.new_record == {**dict.fromkeys(columns), "id": 1, "p": "red"}


def test_matrix_literals_are_valid_json_where_json() -> None:
    # Guards the matrix itself: the JSON literals must parse (so that a
    # mismatch points at walex, not at a typo here).
    for name, sql_type, literal in COLUMNS:
        if sql_type in ("json", "jsonb"):
            json.loads(literal.strip("'"))
        assert name.startswith("c_")
    assert len({name for name, _, _ in COLUMNS}) == len(COLUMNS)

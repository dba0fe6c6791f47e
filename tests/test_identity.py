"""REPLICA IDENTITY and TOAST end to end: what old_record and changes hold.

What the server sends for the old row of an update or delete depends on the
table's replica identity:

- DEFAULT: the primary-key columns, and for an update only when the key
  changed;
- USING INDEX: the same, with the columns of the chosen unique index;
- FULL: the whole old row, for every update and delete;
- NOTHING: no old row ever; Postgres refuses UPDATE and DELETE on such a
  table while a publication that publishes them includes it.

:attr:`walex.Event.changes` needs the whole old row, so it is only known
under FULL (and then names exactly the columns that differ).

An unchanged TOASTed value (stored out of line) is not sent in the new row
of an update: under FULL walex fills it from the old row; otherwise it is
left out of ``new_record`` and named in ``unchanged_toast``.
"""

from __future__ import annotations

import hashlib

import psycopg
import pytest

import walex
from tests.fix_pg import Database
from tests.streams import collect


def _publish(db: Database, table: str, options: str = "") -> str:
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE {table} {options}")
    return pub


async def _capture(
    db: Database, pub: str, statements: list[str], count: int, *, binary: bool = False
) -> list[walex.Event]:
    async with walex.connect(db.dsn, publication=pub, binary=binary) as stream:
        with db.connect() as conn:
            for statement in statements:
                conn.execute(statement)
        return await collect(stream, count, 20.0)


async def test_default_identity_sends_the_old_key_only_when_it_changes(db: Database) -> None:
    db.execute("CREATE TABLE t (k1 int, k2 text, a text, b int, PRIMARY KEY (k1, k2))")
    pub = _publish(db, "t")
    ins, upd, key_upd, dele = await _capture(
        db,
        pub,
        [
            "INSERT INTO t VALUES (1, 'x', 'first', 10)",
            "UPDATE t SET a = 'second', b = 11 WHERE k1 = 1",  # not the key
            "UPDATE t SET k1 = 2, a = 'third' WHERE k1 = 1",  # the key
            "DELETE FROM t WHERE k1 = 2",
        ],
        4,
    )
    src = ins.source
    assert src is not None
    assert (src.replica_identity, src.primary_key, src.identity_columns) == (
        "default",
        ("k1", "k2"),
        ("k1", "k2"),
    )
    assert ins.type == "insert"
    assert ins.new_record == {"k1": 1, "k2": "x", "a": "first", "b": 10}
    assert (ins.old_record, ins.changes) == (None, None)

    assert upd.type == "update"
    assert upd.new_record == {"k1": 1, "k2": "x", "a": "second", "b": 11}
    assert upd.old_record is None  # the key did not change: no old row at all
    assert upd.changes is None  # the old values are unknown
    assert upd.unchanged_toast == frozenset()

    assert key_upd.type == "update"
    assert key_upd.new_record == {"k1": 2, "k2": "x", "a": "third", "b": 11}
    assert key_upd.old_record == {"k1": 1, "k2": "x"}  # the old key, nothing else
    assert key_upd.changes is None

    assert dele.type == "delete"
    assert dele.new_record is None
    assert dele.old_record == {"k1": 2, "k2": "x"}
    assert dele.changes is None
    assert dele.record == {"k1": 2, "k2": "x"}


async def test_full_identity_sends_the_whole_old_row(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY, a text, b int, c jsonb)")
    db.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    pub = _publish(db, "t")
    ins, upd, same, key_upd, to_null, dele = await _capture(
        db,
        pub,
        [
            """INSERT INTO t VALUES (1, 'first', 10, '{"x": 1}')""",
            "UPDATE t SET a = 'second' WHERE id = 1",
            "UPDATE t SET a = a WHERE id = 1",  # a row update that changes nothing
            "UPDATE t SET id = 2 WHERE id = 1",
            "UPDATE t SET b = NULL, c = '[]' WHERE id = 2",
            "DELETE FROM t WHERE id = 2",
        ],
        6,
    )
    src = ins.source
    assert src is not None
    assert (src.replica_identity, src.primary_key, src.identity_columns) == (
        "full",
        ("id",),
        ("id", "a", "b", "c"),
    )
    assert ins.old_record is None
    assert ins.changes is None

    assert upd.old_record == {"id": 1, "a": "first", "b": 10, "c": {"x": 1}}
    assert upd.new_record == {"id": 1, "a": "second", "b": 10, "c": {"x": 1}}
    assert upd.changes == {"a": ("first", "second")}

    assert same.old_record == same.new_record == upd.new_record
    assert same.changes == {}  # the old row is known and nothing differs

    assert key_upd.old_record == {"id": 1, "a": "second", "b": 10, "c": {"x": 1}}
    assert key_upd.new_record == {"id": 2, "a": "second", "b": 10, "c": {"x": 1}}
    assert key_upd.changes == {"id": (1, 2)}

    assert to_null.changes == {"b": (10, None), "c": ({"x": 1}, [])}

    assert dele.old_record == {"id": 2, "a": "second", "b": None, "c": []}
    assert dele.new_record is None
    assert dele.changes is None


async def test_using_index_identity_sends_the_index_columns(db: Database) -> None:
    db.execute(
        "CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL, region int NOT NULL, a text)"
    )
    db.execute("CREATE UNIQUE INDEX t_code_region ON t (region, code)")
    db.execute("ALTER TABLE t REPLICA IDENTITY USING INDEX t_code_region")
    pub = _publish(db, "t")
    ins, upd, pk_upd, key_upd, dele = await _capture(
        db,
        pub,
        [
            "INSERT INTO t VALUES (1, 'A', 7, 'first')",
            "UPDATE t SET a = 'second' WHERE id = 1",  # not in the index
            "UPDATE t SET id = 2 WHERE id = 1",  # the primary key, not in the index
            "UPDATE t SET code = 'B' WHERE id = 2",  # a column of the index
            "DELETE FROM t WHERE id = 2",
        ],
        5,
    )
    src = ins.source
    assert src is not None
    # identity_columns follow the table's column order, not the index's.
    assert (src.replica_identity, src.primary_key, src.identity_columns) == (
        "index",
        ("id",),
        ("code", "region"),
    )
    assert upd.new_record == {"id": 1, "code": "A", "region": 7, "a": "second"}
    assert upd.old_record is None
    assert upd.changes is None

    # The identity is the index, not the primary key: changing the key
    # sends no old row.
    assert pk_upd.new_record == {"id": 2, "code": "A", "region": 7, "a": "second"}
    assert pk_upd.old_record is None
    assert pk_upd.changes is None

    assert key_upd.new_record == {"id": 2, "code": "B", "region": 7, "a": "second"}
    assert key_upd.old_record == {"code": "A", "region": 7}
    assert key_upd.changes is None

    assert dele.old_record == {"code": "B", "region": 7}
    assert dele.changes is None


async def test_nothing_identity_refuses_updates_and_deletes(db: Database) -> None:
    # With REPLICA IDENTITY NOTHING, Postgres itself refuses UPDATE and DELETE
    # on a table in a publication that publishes them: there would be no way
    # to say which row changed. Inserts still work and still arrive.
    db.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    db.execute("ALTER TABLE t REPLICA IDENTITY NOTHING")
    pub = _publish(db, "t")
    async with walex.connect(db.dsn, publication=pub) as stream:
        with db.connect() as conn:
            conn.execute("INSERT INTO t VALUES (1, 'a')")
            with pytest.raises(
                psycopg.errors.ObjectNotInPrerequisiteState,
                match=r'cannot update table "t" because it does not have a replica identity'
                r" and publishes updates",
            ):
                conn.execute("UPDATE t SET a = 'b' WHERE id = 1")
            with pytest.raises(
                psycopg.errors.ObjectNotInPrerequisiteState,
                match=r'cannot delete from table "t" because it does not have a replica'
                r" identity and publishes deletes",
            ):
                conn.execute("DELETE FROM t WHERE id = 1")
            conn.execute("INSERT INTO t VALUES (2, 'b')")
        events = await collect(stream, 2, 20.0)
    assert [(e.type, e.new_record) for e in events] == [
        ("insert", {"id": 1, "a": "a"}),
        ("insert", {"id": 2, "a": "b"}),
    ]
    src = events[0].source
    assert src is not None
    assert (src.replica_identity, src.primary_key, src.identity_columns) == (
        "nothing",
        ("id",),
        (),
    )
    assert db.fetch("SELECT id, a FROM t ORDER BY id") == [(1, "a"), (2, "b")]


async def test_nothing_identity_with_an_insert_only_publication(db: Database) -> None:
    # A publication WITH (publish = 'insert') does not publish updates or
    # deletes, so Postgres allows them on a table with no replica identity;
    # only the inserts reach walex.
    db.execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
    db.execute("ALTER TABLE t REPLICA IDENTITY NOTHING")
    pub = _publish(db, "t", "WITH (publish = 'insert')")
    events = await _capture(
        db,
        pub,
        [
            "INSERT INTO t VALUES (1, 'a')",
            "UPDATE t SET a = 'b' WHERE id = 1",
            "DELETE FROM t WHERE id = 1",
            "INSERT INTO t VALUES (2, 'c')",
        ],
        2,
    )
    assert [(e.type, e.new_record, e.old_record) for e in events] == [
        ("insert", {"id": 1, "a": "a"}, None),
        ("insert", {"id": 2, "a": "c"}, None),
    ]
    assert events[0].source is not None
    assert events[0].source.replica_identity == "nothing"
    assert db.fetch("SELECT id FROM t") == [(2,)]


async def test_default_identity_without_a_primary_key_refuses_updates(db: Database) -> None:
    # DEFAULT with no primary key is no identity at all: same as NOTHING.
    db.execute("CREATE TABLE t (id int, a text)")
    _publish(db, "t")
    db.execute("INSERT INTO t VALUES (1, 'a')")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="replica identity"):
        db.execute("UPDATE t SET a = 'b'")


def _text(size: int, seed: str) -> str:
    """*size* characters that do not compress (hex of a hash chain)."""
    out, block = [], seed.encode()
    while sum(map(len, out)) < size:
        block = hashlib.sha256(block).digest()
        out.append(block.hex())
    return "".join(out)[:size]


MODES = [pytest.param(False, id="text"), pytest.param(True, id="binary")]


@pytest.mark.parametrize("binary", MODES)
@pytest.mark.parametrize("identity", ["default", "full"])
async def test_unchanged_toast(db: Database, identity: str, binary: bool) -> None:
    body, body2 = _text(10_000, "one"), _text(12_000, "two")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, n int, body text, note text)")
    # EXTERNAL: out of line, and not compressed, so 10 kB surely is TOASTed.
    db.execute("ALTER TABLE t ALTER COLUMN body SET STORAGE EXTERNAL")
    db.execute(f"ALTER TABLE t REPLICA IDENTITY {identity}")
    pub = _publish(db, "t")
    async with walex.connect(db.dsn, publication=pub, binary=binary) as stream:
        with db.connect() as conn:
            conn.execute("INSERT INTO t VALUES (1, 1, %s, 'x')", (body,))
            stored = conn.execute(
                "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 't'::regclass"
            ).fetchone()
            assert stored is not None
            assert stored[0] > 0, "the body was not stored out of line"
            conn.execute("UPDATE t SET n = n + 1")  # body unchanged
            conn.execute("UPDATE t SET id = 5, note = NULL")  # the key; body unchanged
            conn.execute("UPDATE t SET body = %s, n = 3", (body2,))  # body changed
            conn.execute("UPDATE t SET note = 'y'")  # the new body unchanged
            conn.execute("DELETE FROM t")
        ins, upd, key_upd, body_upd, upd2, dele = await collect(stream, 6, 20.0)

    assert ins.new_record == {"id": 1, "n": 1, "body": body, "note": "x"}
    assert ins.unchanged_toast == frozenset()
    # A changed TOASTed value arrives whole, whatever the identity.
    assert body_upd.new_record == {"id": 5, "n": 3, "body": body2, "note": None}
    assert body_upd.unchanged_toast == frozenset()

    if identity == "default":
        # The value is not in the WAL of the update: it is not in the record
        # and it is not a change; the event names it instead.
        assert upd.new_record == {"id": 1, "n": 2, "note": "x"}
        assert upd.unchanged_toast == frozenset({"body"})
        assert upd.old_record is None
        assert upd.changes is None

        assert key_upd.new_record == {"id": 5, "n": 2, "note": None}
        assert key_upd.unchanged_toast == frozenset({"body"})
        assert key_upd.old_record == {"id": 1}
        assert key_upd.changes is None

        assert body_upd.old_record is None
        assert body_upd.changes is None

        assert upd2.new_record == {"id": 5, "n": 3, "note": "y"}
        assert upd2.unchanged_toast == frozenset({"body"})

        assert dele.old_record == {"id": 5}
    else:
        # The old row carries the value: the new row is filled from it, and
        # an unchanged value is never a change.
        assert upd.old_record == {"id": 1, "n": 1, "body": body, "note": "x"}
        assert upd.new_record == {"id": 1, "n": 2, "body": body, "note": "x"}
        assert upd.unchanged_toast == frozenset()
        assert upd.changes == {"n": (1, 2)}

        assert key_upd.new_record == {"id": 5, "n": 2, "body": body, "note": None}
        assert key_upd.unchanged_toast == frozenset()
        assert key_upd.changes == {"id": (1, 5), "note": ("x", None)}

        assert body_upd.old_record == {"id": 5, "n": 2, "body": body, "note": None}
        assert body_upd.changes == {"n": (2, 3), "body": (body, body2)}

        assert upd2.new_record == {"id": 5, "n": 3, "body": body2, "note": "y"}
        assert upd2.unchanged_toast == frozenset()
        assert upd2.changes == {"note": (None, "y")}

        assert dele.old_record == {"id": 5, "n": 3, "body": body2, "note": "y"}
    for event in (upd, key_upd, upd2):
        assert "body" not in (event.changes or {})
    assert dele.type == "delete"
    assert dele.unchanged_toast == frozenset()

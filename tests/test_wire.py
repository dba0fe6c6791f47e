"""The wire format: one JSON shape for every event, lossless values, a JSON Schema."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any
from uuid import UUID

import jsonschema
import pytest
from psycopg.types.range import Range

import walex
from tests.fix_pg import Database
from tests.fix_services import make_events
from tests.streams import collect
from walex.wire import JSON_SCHEMA, WIRE_VERSION, dumpb, dumps, encode_value, to_dict

ROOT = Path(__file__).resolve().parent.parent
VALIDATOR = jsonschema.Draft202012Validator(
    JSON_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def test_schema_file_is_the_schema_in_the_code() -> None:
    on_disk = json.loads((ROOT / "docs" / "event.schema.json").read_text())
    assert on_disk == JSON_SCHEMA
    jsonschema.Draft202012Validator.check_schema(JSON_SCHEMA)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Decimal("1234.50"), "1234.50"),
        (Decimal("NaN"), "NaN"),
        (Decimal("-Infinity"), "-Infinity"),
        (float("nan"), "NaN"),
        (float("inf"), "Infinity"),
        (-math.inf, "-Infinity"),
        (1.5, 1.5),
        (2**70, 2**70),
        (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), "2024-05-01T12:00:00+00:00"),
        (datetime(2024, 5, 1, 12, 0, 0, 5), "2024-05-01T12:00:00.000005"),
        (date(2024, 2, 29), "2024-02-29"),
        (time(23, 59, 59, 999999), "23:59:59.999999"),
        (time(1, 2, tzinfo=timezone(timedelta(hours=2))), "01:02:00+02:00"),
        (timedelta(days=1, seconds=3600, microseconds=500000), "P1DT3600.5S"),
        (timedelta(days=-1, seconds=86399), "P-1DT86399S"),
        (UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (ip_address("::1"), "::1"),
        (ip_network("10.0.0.0/8"), "10.0.0.0/8"),
        (b"\x00\xff", "\\x00ff"),
        (memoryview(b"ab"), "\\x6162"),
        (Range(1, 10, "[)"), {"lower": 1, "upper": 10, "bounds": "[)", "empty": False}),
        (Range(empty=True), {"lower": None, "upper": None, "bounds": "", "empty": True}),
        ({"a": [Decimal("1.0"), None]}, {"a": ["1.0", None]}),
        ([[1, 2], [3, 4]], [[1, 2], [3, 4]]),
        ("text ✓", "text ✓"),
        (True, True),
        (None, None),
    ],
    ids=repr,
)
def test_values_are_encoded_without_loss(value: Any, wire: Any) -> None:
    assert encode_value(value) == wire


def test_dumps_and_dumpb_write_the_same_document() -> None:
    (event,) = make_events(1)
    big = event._replace(new_record={"id": 1, "v": 2**70, "name": "é"})
    for e in (event, big):
        assert json.loads(dumpb(e)) == json.loads(dumps(e)) == to_dict(e)
        assert b"\n" not in dumpb(e)
    assert json.loads(dumpb(big))["new_record"]["v"] == 2**70


async def test_every_kind_of_event_matches_the_schema(cdc_db: Database) -> None:
    pub = cdc_db.unique("pub")
    cdc_db.execute(
        "CREATE TABLE acct (id int PRIMARY KEY, balance numeric, at timestamptz, tags text[],"
        " span int4range, raw bytea, ratio float8, uid uuid, meta jsonb)"
    )
    cdc_db.execute("ALTER TABLE acct REPLICA IDENTITY FULL")
    cdc_db.execute("CREATE TABLE nokey (a int, b text)")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE acct, nokey")
    async with walex.connect(cdc_db.dsn, publication=pub) as stream:
        with cdc_db.connect() as conn:
            conn.execute(
                "INSERT INTO acct VALUES (1, 10.50, '2024-05-01 12:00+00', '{a,b}', '[1,5)',"
                " '\\x00ff', 'NaN', '12345678-1234-5678-1234-567812345678',"
                " '{\"n\": 12345678901234567890}')"
            )
            conn.execute("UPDATE acct SET balance = 11, ratio = '-Infinity' WHERE id = 1")
            conn.execute("INSERT INTO nokey VALUES (1, 'x')")
            conn.execute("DELETE FROM acct WHERE id = 1")
            conn.execute("TRUNCATE acct, nokey")
            conn.execute("SELECT pg_logical_emit_message(true, 'audit', 'paid')")
            conn.execute("SELECT pg_logical_emit_message(false, 'bin', '\\xff00'::bytea)")
        events = await collect(stream, 8)
    docs = [json.loads(dumpb(e)) for e in events]
    for doc in docs:
        errors = sorted(VALIDATOR.iter_errors(doc), key=str)
        assert not errors, f"{doc['type']}: {[e.message for e in errors]}"
        assert doc["version"] == WIRE_VERSION
    ins, upd, nokey, dele, trunc1, trunc2, msg, binmsg = docs
    assert ins["new_record"] == {
        "id": 1,
        "balance": "10.50",
        "at": "2024-05-01T12:00:00+00:00",
        "tags": ["a", "b"],
        "span": {"lower": 1, "upper": 5, "bounds": "[)", "empty": False},
        "raw": "\\x00ff",
        "ratio": "NaN",
        "uid": "12345678-1234-5678-1234-567812345678",
        "meta": {"n": 12345678901234567890},
    }
    assert ins["primary_key"] == {"id": 1}
    assert ins["id"] == f"{ins['commit_lsn']}:0"
    assert upd["changes"] == {"balance": ["10.50", "11"], "ratio": ["NaN", "-Infinity"]}
    assert nokey["primary_key"] == {}
    assert dele["old_record"]["balance"] == "11"
    assert (trunc1["truncated"], trunc1["restart_identity"]) == (
        ["public.acct", "public.nokey"],
        False,
    )
    assert trunc2["table"] == "nokey"
    assert (msg["schema"], msg["prefix"], msg["content"], msg["content_encoding"]) == (
        None,
        "audit",
        "paid",
        "text",
    )
    assert (binmsg["content"], binmsg["content_encoding"]) == ("\\xff00", "hex")
    # Commit order and identity on the wire.
    assert datetime.fromisoformat(ins["commit_timestamp"]).tzinfo is not None

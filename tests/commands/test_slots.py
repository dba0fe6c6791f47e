"""``walex slots`` against a real Postgres: list, drop, and refusing an active slot."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

import walex
from tests.fix_pg import Database
from walex.cli import main


def test_list_shows_plugin_activity_and_lag(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    slot = db.unique("listed")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    db.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
    assert main(["slots", db.dsn]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == [
        "SLOT",
        "PLUGIN",
        "DATABASE",
        "ACTIVE PID",
        "LAG",
        "WAL KEPT",
        "WAL STATUS",
    ]
    (row,) = [line for line in lines if line.startswith(slot + " ")]
    cells = row.split()
    assert cells[:4] == [slot, "pgoutput", db.name, "idle"]
    assert cells[-1] == "reserved"

    assert main(["slots", db.dsn, "list", "--format", "json"]) == 0
    (info,) = [s for s in json.loads(capsys.readouterr().out) if s["name"] == slot]
    assert info["plugin"] == "pgoutput"
    assert info["active"] is False
    assert info["temporary"] is False
    assert info["lag_bytes"] > 10_000  # the table written after the slot
    assert info["wal_status"] == "reserved"


def test_drop(db: Database, capsys: pytest.CaptureFixture[str]) -> None:
    slot = db.unique("gone")
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    assert main(["slots", db.dsn, "drop", slot]) == 0
    assert capsys.readouterr().out == f"dropped slot {slot!r}\n"
    assert db.fetch("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [slot]) == []
    assert main(["slots", db.dsn, "drop", slot]) == 1
    assert f"there is no replication slot {slot!r}" in capsys.readouterr().err


async def test_drop_refuses_an_active_slot(
    db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    pub, slot = db.unique("pub"), db.unique("busy")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True):
        code = await asyncio.to_thread(main, ["slots", db.dsn, "drop", slot])
        err = capsys.readouterr().err
        assert code == 1
        assert err.startswith(f"walex: slot {slot!r} is in use by server process ")
        assert "stop its consumer first" in err
        assert db.fetch("SELECT active FROM pg_replication_slots WHERE slot_name = %s", [slot]) == [
            (True,)
        ]


def test_drop_needs_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["slots", "postgresql://localhost/app", "drop"])
    assert exc.value.code == 2
    assert "drop needs the slot's NAME" in capsys.readouterr().err

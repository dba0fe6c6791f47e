"""The seed README's example (examples/seed) runs end to end against a real Postgres."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fix_pg import Database

ROOT = Path(__file__).resolve().parent.parent


def run_example(dsn: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed" / "main.py"), "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_seed_example_handles_every_change(db: Database) -> None:
    lines = run_example(db.dsn)
    assert lines[0].startswith(
        "user_account_insert_event: {'id': 1, 'email': 'chase@example.com', 'name': 'Chase',"
    )
    assert "user_account_update_event: {'name': ('Chase', 'Chase Pursley')}" in lines
    # The update of updated_at alone is unwatched: one update event only.
    assert sum(line.startswith("user_account_update_event") for line in lines) == 1
    assert (
        "todo_insert_event: {'id': 1, 'user_account_id': 1, 'title': 'write docs',"
        " 'status': 'open'}" in lines
    )
    assert "todo_update_event: {'status': ('open', 'done')}" in lines
    assert (
        "todo_delete_event: {'id': 1, 'user_account_id': 1, 'title': 'write docs',"
        " 'status': 'done'}" in lines
    )
    # todo 2 was archived: its archiving and its delete are unwatched records.
    assert sum(line.startswith("todo_update_event") for line in lines) == 1
    assert sum(line.startswith("todo_delete_event") for line in lines) == 1
    # The function pipeline ran after the handler, once per event.
    assert sum(line.startswith("todo_") and "_logged: " in line for line in lines) == 4
    assert any(line.startswith("user_account_delete_event: {'id': 1,") for line in lines)
    assert lines[-1] == "demo: every change handled and confirmed"
    # Everything was confirmed: a second run (same durable slot, the same
    # changes made again) handles the second run's changes only.
    again = run_example(db.dsn)
    assert sum(line.startswith("user_account_insert_event") for line in again) == 1
    assert [line.split(":")[0] for line in again] == [line.split(":")[0] for line in lines]

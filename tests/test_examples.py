"""The README's example programs run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fix_pg import Database

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_against_a_real_database(db: Database) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--dsn", db.dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "insert todo: {'id': 1, 'title': 'write the docs', 'done': False}" in out
    assert "update todo: {'id': 2, 'title': 'ship it', 'done': True}" in out
    assert "changed: {'done': (False, True)}" in out
    assert "delete todo: {'id': 1, 'title': 'write the docs', 'done': False}" in out
    assert "message quickstart: b'all done'" in out

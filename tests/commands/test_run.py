"""`walex run`: apps from a module or a TOML file, until SIGINT/SIGTERM, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import walex
from tests.fix_pg import Database
from tests.helpers import confirmed_flush, seed_tables
from walex.cli import main
from walex.lsn import LSN

ROOT = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def walex_run(args: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "walex", *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )


def test_run_module_app_until_sigterm(db: Database, tmp_path: Path) -> None:
    seed = ROOT / "examples" / "seed"
    db.execute((seed / "schema.sql").read_text())
    db.execute("CREATE PUBLICATION events FOR TABLE user_account, todo")
    log = tmp_path / "out.log"
    proc = walex_run(["run", "example_app:app"], seed, log, {"WALEX_URL": db.dsn})
    try:
        wait_for(lambda: "streaming from slot" in log.read_text(), "the app to start")
        db.execute("INSERT INTO user_account (id, email, name) VALUES (1, 'a@b', 'Ann')")
        wait_for(lambda: "user_account_insert_event" in log.read_text(), "the handler")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "'email': 'a@b'" in text
    assert "Traceback" not in text


def test_run_config_file_graceful_sigint_confirms_the_handled(db: Database, tmp_path: Path) -> None:
    pub = seed_tables(db)
    name = db.unique("cli")
    seen = tmp_path / "seen.txt"
    (tmp_path / "cli_handlers.py").write_text(
        textwrap.dedent(
            f"""
            import time
            def slow(events):
                with open({str(seen)!r}, "a") as f:
                    f.write("started\\n")
                time.sleep(1.0)
                with open({str(seen)!r}, "a") as f:
                    for e in events:
                        f.write(f"done {{e.new_record['id']}} {{e.commit_lsn}}\\n")
            """
        )
    )
    config = tmp_path / "walex.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            name = "{name}"
            publication = "{pub}"
            subscriptions = ["todo"]

            [[handlers]]
            handler = "cli_handlers:slow"
            table = "todo"
            type = "insert"
            """
        )
    )
    log = tmp_path / "out.log"
    proc = walex_run(["run", "--config", str(config)], tmp_path, log, {"WALEX_URL": db.dsn})
    try:
        wait_for(lambda: "streaming from slot" in log.read_text(), "the app to start")
        db.execute("INSERT INTO todo (id, title) VALUES (1, 'x')")
        wait_for(lambda: seen.exists() and "started" in seen.read_text(), "the handler")
        proc.send_signal(signal.SIGINT)  # while the handler sleeps
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
    lines = seen.read_text().splitlines()
    assert lines[0] == "started"
    assert lines[1].startswith("done 1 ")
    # What the handler finished was confirmed before exiting.
    assert confirmed_flush(db, f"walex_{name}") > LSN.parse(lines[1].split()[2])


def test_run_reports_a_bad_reference(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["run", "no_such_module_xyz:app"]) == 2  # configuration: EXIT_CODES
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert main(["run", "os:sep"]) == 2
    assert "not a walex.WalEx app" in capsys.readouterr().err
    assert main(["run"]) == 2
    assert "name an app" in capsys.readouterr().err
    # A callable that needs arguments is not taken for a factory.
    assert main(["run", "json:dumps"]) == 2
    assert "json:dumps needs arguments" in capsys.readouterr().err
    # A factory that fails: its error, one line, not a traceback.
    (tmp_path / "failing_factory_xyz.py").write_text(
        "def create_app():\n    raise RuntimeError('DATABASE_URL is not set')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["run", "failing_factory_xyz:create_app"]) == 2
    err = capsys.readouterr().err
    assert "failing_factory_xyz:create_app() raised RuntimeError: DATABASE_URL is not set" in err
    assert "Traceback" not in err


async def test_sigterm_stops_an_app_waiting_as_a_standby(db: Database, tmp_path: Path) -> None:
    from tests.helpers import make_app

    pub = seed_tables(db)
    name = db.unique("standby")
    holder = make_app(db, pub, name=name)
    await holder.start()  # holds the durable slot
    try:
        config = tmp_path / "walex.toml"
        config.write_text(f'name = "{name}"\npublication = "{pub}"\nstandby_retry = 0.2\n')
        log = tmp_path / "out.log"
        proc = walex_run(["run", "--config", str(config)], tmp_path, log, {"WALEX_URL": db.dsn})
        try:
            await asyncio.to_thread(
                wait_for, lambda: "waiting as a standby" in log.read_text(), "the standby"
            )
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
        finally:
            proc.kill()
        assert holder.running
    finally:
        await holder.stop()


def test_a_failing_app_exits_1_with_the_error(db: Database, tmp_path: Path) -> None:
    pub = seed_tables(db)
    (tmp_path / "bad_handlers.py").write_text(
        "def bad(events):\n    raise RuntimeError('handler exploded')\n"
    )
    config = tmp_path / "walex.toml"
    config.write_text(
        f'name = "{db.unique("bad")}"\npublication = "{pub}"\nretries = 0\n'
        '[[handlers]]\nhandler = "bad_handlers:bad"\ntable = "todo"\ntype = "insert"\n'
    )
    log = tmp_path / "out.log"
    proc = walex_run(["run", "--config", str(config)], tmp_path, log, {"WALEX_URL": db.dsn})
    try:
        wait_for(lambda: "streaming from slot" in log.read_text(), "the app to start")
        db.execute("INSERT INTO todo (id) VALUES (1)")
        assert proc.wait(timeout=30) == 1, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "walex: " in text
    assert text.count("handler exploded") == 1, "the error is said once, not logged and printed"
    assert "not confirmed" in text


DOWN_DESTINATION = """
class Down:
    '''A destination whose broker is away: every send fails, as in an outage.'''

    def __init__(self, marker):
        self.name = "down"
        self.marker = marker

    async def start(self):
        pass

    async def send(self, events):
        with open(self.marker, "a") as f:
            f.write("try\\n")
        raise ConnectionError("broker unreachable")

    async def close(self):
        pass
"""


def test_sigterm_during_a_destination_outage_stops_at_once(db: Database, tmp_path: Path) -> None:
    """retries = 100000 holds the position through an outage, yet a graceful
    stop does not wait for the next retry: it stops now, unconfirmed."""
    from tests.helpers import make_app

    pub = seed_tables(db)
    name = db.unique("outage")
    tries = tmp_path / "tries.txt"
    (tmp_path / "outage_destination.py").write_text(DOWN_DESTINATION)
    config = tmp_path / "walex.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            name = "{name}"
            publication = "{pub}"
            retries = 100000
            retry_delay = 2

            [[destinations]]
            class = "outage_destination:Down"
            marker = "{tries}"
            tables = ["todo"]
            """
        )
    )
    log = tmp_path / "out.log"
    proc = walex_run(["run", "--config", str(config)], tmp_path, log, {"WALEX_URL": db.dsn})
    try:
        wait_for(lambda: "streaming from slot" in log.read_text(), "the app to start")
        db.execute("INSERT INTO todo (id) VALUES (1)")
        wait_for(lambda: tries.exists() and len(tries.read_text().split()) >= 2, "a retry")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - stopped < 3, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "Traceback" not in text
    assert "not confirmed" in text

    async def delivered_again() -> list[walex.Event]:
        again = make_app(db, pub, name=name)
        got: list[walex.Event] = []
        arrived = asyncio.Event()

        @again.on_insert("todo")
        async def collect(events: list[walex.Event]) -> None:
            got.extend(events)
            arrived.set()

        async with again, asyncio.timeout(15):
            await arrived.wait()
        return got

    got = asyncio.run(delivered_again())
    assert [(e.new_record or {}).get("id") for e in got] == [1]


def test_a_forced_stop_that_leaves_work_unconfirmed_exits_3(db: Database, tmp_path: Path) -> None:
    pub = seed_tables(db)
    started = tmp_path / "started.txt"
    (tmp_path / "slow_handlers.py").write_text(
        textwrap.dedent(
            f"""
            import asyncio
            async def slow(events):
                open({str(started)!r}, "w").close()
                await asyncio.sleep(60)
            """
        )
    )
    config = tmp_path / "walex.toml"
    config.write_text(
        f'name = "{db.unique("forced")}"\npublication = "{pub}"\n'
        '[[handlers]]\nhandler = "slow_handlers:slow"\ntable = "todo"\ntype = "insert"\n'
    )
    log = tmp_path / "out.log"
    proc = walex_run(["run", "--config", str(config)], tmp_path, log, {"WALEX_URL": db.dsn})
    try:
        wait_for(lambda: "streaming from slot" in log.read_text(), "the app to start")
        db.execute("INSERT INTO todo (id) VALUES (1)")
        wait_for(started.exists, "the handler")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping gracefully" in log.read_text(), "the first signal")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 3, log.read_text()  # a forced stop: EXIT_CODES
    finally:
        proc.kill()
    text = log.read_text()
    assert "forced stop: the transaction being handled was not confirmed" in text
    assert "Traceback" not in text


def test_a_module_that_raises_at_import_is_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_at_import_xyz.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["run", "broken_at_import_xyz:app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "importing module 'broken_at_import_xyz' raised ZeroDivisionError" in err
    assert "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_config_file_serves_metrics_and_says_what_runs(db: Database, tmp_path: Path) -> None:
    pub = seed_tables(db)
    port = _free_port()
    (tmp_path / "listed_handlers.py").write_text("def noop(events):\n    pass\n")
    config = tmp_path / "walex.toml"
    config.write_text(
        f'name = "{db.unique("listed")}"\npublication = "{pub}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\nmax_lag_bytes = 1000000000\n'
        '[[handlers]]\nhandler = "listed_handlers:noop"\ntable = "todo"\ntype = "insert"\n'
        f'[[destinations]]\ntype = "file"\npath = "{tmp_path / "out.jsonl"}"\n'
        'tables = ["user_account"]\n'
    )
    log = tmp_path / "out.log"
    proc = walex_run(["run", "--config", str(config)], tmp_path, log, {"WALEX_URL": db.dsn})
    try:
        wait_for(lambda: "streaming from slot" in log.read_text(), "the app to start")
        text = log.read_text()
        assert "public.todo, public.user_account" in text, text
        assert "handler listed_handlers:noop gets insert of public.todo" in text, text
        assert "destination file gets every change of public.user_account" in text, text

        def answer(path: str) -> tuple[int, bytes]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read()

        wait_for(lambda: answer("/healthz")[0] == 200, "a healthy app")
        status, body = answer("/metrics")
        assert status == 200
        assert b"walex_connected" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
    with pytest.raises(ConnectionRefusedError):  # the server went with the app
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_bad_metrics_table_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "walex.toml"
    config.write_text('publication = "p"\n[metrics]\nlisten = "nowhere"\n')
    assert main(["run", "--config", str(config)]) == 2
    assert "[metrics] listen must be HOST:PORT" in capsys.readouterr().err

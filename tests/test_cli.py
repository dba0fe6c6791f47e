"""What every walex command shares: --help with an example, one-line errors, no secrets."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import walex
from walex import cli
from walex.admin import mask_dsn
from walex.cli import EXIT_CODES, main

MINE = ["demo", "tail", "doctor", "setup", "slots"]


@pytest.mark.parametrize("command", MINE)
def test_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: walex {command}" in out
    assert f"examples:\n  walex {command}" in out


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in MINE:
        assert command in out


def test_an_error_is_one_line_and_a_traceback_needs_debug() -> None:
    dsn = "postgresql://walex:s3cret@127.0.0.1:1/app?connect_timeout=2"
    plain = subprocess.run(
        [sys.executable, "-m", "walex", "slots", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert plain.returncode == 1
    assert plain.stderr.startswith("walex: could not connect to the server")
    assert "check the host, port and that it is running" in plain.stderr
    assert plain.stderr.count("\n") == 1
    assert "s3cret" not in plain.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "walex", "--debug", "slots", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
    assert "ConnectionFailed" in debug.stderr


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://app:s3cret@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            "postgres://app:p%40ss@db/app?sslmode=require",
            "postgres://app:***@db/app?sslmode=require",
        ),
        ("postgresql://app@db/app?password=s3cret&x=1", "postgresql://app@db/app?password=***&x=1"),
        ("postgresql://db/app", "postgresql://db/app"),
        ("host=db user=app password=s3cret dbname=app", "host=db user=app password=*** dbname=app"),
        ("host=db dbname=app", "host=db dbname=app"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize(
    "command", [["doctor"], ["setup", "--publication", "p"], ["slots"], ["tail"]]
)
@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:50%off-s3cret@127.0.0.1:1/app",
        "postgresql://app:s3cret@[127.0.0.1/app",
        "postgresql://app:p@s3cret:x@127.0.0.1:1/app",
    ],
)
def test_a_malformed_url_never_prints_the_password(
    command: list[str], dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([command[0], dsn, *command[1:]])
    out, err = capsys.readouterr()
    assert code != 0
    assert "s3c" not in out + err, out + err
    assert "connection" in out + err or "connect" in out + err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"walex {walex.__version__}\n"


def test_the_exit_codes_are_documented() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in text, code


def test_libraries_per_request_logs_are_quiet_unless_debug() -> None:
    httpx = logging.getLogger("httpx")
    before = httpx.level
    try:
        cli._setup_logging(debug=False)
        assert httpx.getEffectiveLevel() == logging.WARNING
    finally:
        httpx.setLevel(before)

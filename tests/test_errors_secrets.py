"""No message, log line or exception text holds a password, whatever the input.

Every entry point that takes a connection string is tried with hostile ones
(bad percent-encoding, unclosed brackets, passwords with ``@``, ``:``,
``%``, quotes and non-ASCII letters): walex.connect, the app, ``walex run``,
``tail``, ``doctor``, ``setup`` and ``slots``. All of them go through
:func:`walex.errors.scrub`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

import walex
from tests.helpers import HOSTILE, SECRET_PIECES
from walex.cli import main
from walex.errors import WalexError

DSNS = [dsn for dsn, _ in HOSTILE] + ["postgresql://app:s3cret-ünï@127.0.0.1:1/app"]


def _clean(text: str) -> None:
    for piece in SECRET_PIECES:
        assert piece not in text, text


@pytest.mark.parametrize("dsn", DSNS)
async def test_connect(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async def open_it() -> None:
        stream = walex.connect(dsn, publication="p", connect_timeout=2)
        try:
            await stream.open()
        finally:
            await stream.aclose()

    with caplog.at_level(logging.DEBUG), pytest.raises(WalexError) as info:
        await open_it()
    _clean(f"{info.value} {info.value!r} {caplog.text}")


@pytest.mark.parametrize("dsn", DSNS)
async def test_app(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async def start_it() -> None:
        app = walex.WalEx(name="masked", url=dsn, publication="p", connect_timeout=2)
        _clean(repr(app))
        await app.start()

    with caplog.at_level(logging.DEBUG), pytest.raises(WalexError) as info:
        await start_it()
    _clean(f"{info.value} {info.value!r} {caplog.text}")


@pytest.mark.parametrize("dsn", DSNS)
def test_run_with_a_config_file(
    dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tmp_path / "walex.toml"
    # A TOML basic string takes JSON's escapes.
    config.write_text(f'publication = "p"\nconnect_timeout = 2\nurl = {json.dumps(dsn)}\n')
    with caplog.at_level(logging.DEBUG):
        code = main(["run", "--config", str(config)])
    out, err = capsys.readouterr()
    assert code != 0
    _clean(out + err + caplog.text)


COMMANDS: dict[str, Callable[[str], list[str]]] = {
    "tail": lambda dsn: ["tail", dsn, "--table", "t"],
    "doctor": lambda dsn: ["doctor", dsn],
    "setup": lambda dsn: ["setup", dsn, "--publication", "p", "--table", "t"],
    "slots": lambda dsn: ["slots", dsn],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("dsn", DSNS)
def test_commands(
    command: str,
    dsn: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        code = main(COMMANDS[command](dsn))
    out, err = capsys.readouterr()
    assert code != 0
    _clean(out + err + caplog.text)

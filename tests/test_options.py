"""walex.options: one StreamOptions, and everything that lists options agrees with it."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import walex
from walex.config import ENGINE_OPTIONS, SETTINGS
from walex.errors import ConfigurationError
from walex.lsn import LSN
from walex.options import StreamOptions, Target

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {f.name: f for f in dataclasses.fields(StreamOptions)}


def test_connect_takes_every_option_with_its_default() -> None:
    params = inspect.signature(walex.connect).parameters
    own = {"dsn", "publication", "slot", "durable"}
    assert set(params) - own == set(FIELDS)
    for name, field in FIELDS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == field.default, name


def test_the_app_settings_are_the_options() -> None:
    assert list(ENGINE_OPTIONS) == list(FIELDS)
    for name, field in FIELDS.items():
        assert SETTINGS[name].help == field.metadata["help"]


def test_docs_list_every_option() -> None:
    text = (ROOT / "docs" / "engine.md").read_text()
    table = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert documented - {"dsn", "publication", "slot", "durable"} == set(FIELDS)


def test_the_app_docs_list_every_option() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    passage = text.split("The engine's options pass through unchanged", 1)[1].split("\n\n")[0]
    assert set(re.findall(r"`(\w+)`", passage)) >= set(FIELDS)


def test_values_are_read_and_checked() -> None:
    options = StreamOptions(start_lsn="16/B374D848", status_interval=2, spool_dir=ROOT)
    assert options.start_lsn == LSN.parse("16/B374D848")
    assert isinstance(options.status_interval, float)
    assert options.spool_dir == str(ROOT)
    assert StreamOptions(receive_timeout=None).receive_timeout is None


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [
        ("max_batch_events", 0, "max_batch_events must be a whole number of at least 1"),
        ("max_batch_events", True, "max_batch_events must be"),
        ("max_batch_bytes", 1.5, "max_batch_bytes must be"),
        ("binary", "yes", "binary must be true or false"),
        ("origin", "some", "origin must be"),
        ("start_lsn", "16", "start_lsn"),
        ("start_lsn", -1, "start_lsn"),
        ("status_interval", 0, "status_interval must be seconds"),
        ("heartbeat_interval", -1, "heartbeat_interval must be seconds"),
        ("spool_dir", 3, "spool_dir must be"),
    ],
)
def test_a_wrong_value_names_the_option(option: str, value: object, phrase: str) -> None:
    with pytest.raises(ConfigurationError, match=phrase):
        StreamOptions(**{option: value})  # type: ignore[arg-type]


def test_a_target_without_a_slot_name_gets_a_temporary_one() -> None:
    target = Target.check("host=h dbname=d", "pub", None, False)
    assert target.slot.startswith("walex_tmp_")
    assert target.publications == ("pub",)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:50%off-s3cret@db/app",
        "host=h password='s3cret",
        "postgresql://app:s3cret@[::1/app",
    ],
)
def test_a_bad_connection_string_is_refused_without_its_password(dsn: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Target.check(dsn, "pub", None, False)
    assert "invalid connection string" in str(info.value)
    assert "s3cret" not in str(info.value)

"""Settings from keyword arguments, WALEX_* variables and TOML files; checked before connecting."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

import walex
from tests.fix_pg import Database
from walex import WalEx
from walex.config import default_slot_name, from_env, redact
from walex.errors import ConfigurationError
from walex.testing import dispatch, make_insert, run_events


def params(app: WalEx) -> dict[str, Any]:
    return conninfo_to_dict(app.settings.conninfo)


def test_connection_by_parts_and_tls_keys() -> None:
    app = WalEx(
        name="example_app",
        hostname="db.internal",
        username="postgres",
        password="s3cret",
        port=5433,
        database="shop",
        sslmode="verify-full",
        sslrootcert="/etc/ca.pem",
        publication="events",
        subscriptions=["user_account", "todo"],
    )
    assert params(app) == {
        "host": "db.internal",
        "user": "postgres",
        "password": "s3cret",
        "port": "5433",
        "dbname": "shop",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ca.pem",
    }
    s = app.settings
    assert s.slot_name == "walex_example_app"
    assert s.durable_slot is True
    assert s.publications == ("events",)
    assert s.subscriptions == ("user_account", "todo")
    assert (s.retries, s.retry_delay, s.max_retry_delay, s.on_error) == (3, 0.5, 30.0, "stop")


def test_url_with_parts_overriding() -> None:
    app = WalEx(url="postgresql://u:pw@h:1/d?sslmode=require", database="other", publication="p")
    assert params(app) == {
        "user": "u",
        "password": "pw",
        "host": "h",
        "port": "1",
        "dbname": "other",
        "sslmode": "require",
    }


def test_password_never_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    app = WalEx(url="postgresql://u:hunter2@h/d", publication="p")
    app2 = WalEx(hostname="h", password="hunter2", publication="p", name="b")
    for a in (app, app2):
        assert "hunter2" not in repr(a)
        assert "hunter2" not in repr(a.settings)
        assert "***" in repr(a)
    assert conninfo_to_dict(redact("host=h password=x")) == {"host": "h", "password": "***"}
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigurationError) as info:
        WalEx(url="postgresql://u:hunter2@h/d?nosuchoption=1", publication="p")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "publication is required"),
        ({"publication": ""}, "publication must be"),
        ({"publication": ["a", 3]}, "publication must be"),
        ({"publication": "p", "port": "x"}, "port must be the port"),
        ({"publication": "p", "port": 70000}, "port must be"),
        ({"publication": "p", "durable_slot": "yes"}, "durable_slot must be true or false"),
        ({"publication": "p", "on_error": "retry"}, "on_error must be one of 'stop', 'skip'"),
        ({"publication": "p", "on_error": "dead_letter"}, "needs dead_letter"),
        ({"publication": "p", "slot_name": "Bad-Name"}, "slot_name must be 1 to 63"),
        ({"publication": "p", "name": "a b"}, "name must be letters"),
        ({"publication": "p", "sslmode": "verify"}, "sslmode must be one of"),
        ({"publication": "p", "retries": -1}, "retries must be"),
        ({"publication": "p", "max_batch_events": 0}, "max_batch_events must be"),
        ({"publication": "p", "subscriptions": ["a.b.c"]}, "subscriptions: "),
        ({"publication": "p", "publicaton": "x"}, "unknown setting 'publicaton'; did you mean"),
        ({"publication": "p", "url": "host=h replication=database"}, "leave 'replication' out"),
        ({"publication": "p", "origin": "some"}, "origin must be one of"),
        ({"publication": "p", "start_lsn": "nope"}, "start_lsn"),
    ],
)
def test_each_error_names_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        WalEx(**kwargs)


def test_default_slot_name_is_a_valid_slot() -> None:
    assert default_slot_name("Shop_EU") == "walex_shop_eu"
    assert len(default_slot_name("x" * 100)) == 63


def test_engine_options_pass_through() -> None:
    app = WalEx(publication="p", binary=True, streaming=True, max_batch_events=10)
    assert dict(app.settings.engine) == {"binary": True, "streaming": True, "max_batch_events": 10}


def test_environment() -> None:
    env = {
        "WALEX_URL": "postgresql://u:pw@h/d",
        "WALEX_PUBLICATION": "events, audit",
        "WALEX_SUBSCRIPTIONS": "user_account,todo",
        "WALEX_DURABLE_SLOT": "false",
        "WALEX_RETRIES": "5",
        "WALEX_RETRY_DELAY": "0.25",
        "WALEX_MAX_BATCH_EVENTS": "100",
        "WALEX_TEST_PG": "16",  # the test suite's own: ignored
        "OTHER": "x",
    }
    app = WalEx.from_env(env, name="from_env")
    s = app.settings
    assert s.publications == ("events", "audit")
    assert s.subscriptions == ("user_account", "todo")
    assert s.durable_slot is False
    assert (s.retries, s.retry_delay) == (5, 0.25)
    assert s.engine["max_batch_events"] == 100
    # Keyword arguments win over the environment.
    assert WalEx.from_env(env, retries=1).settings.retries == 1
    with pytest.raises(ConfigurationError, match="WALEX_DURABLE_SLOT"):
        from_env({"WALEX_DURABLE_SLOTS": "1"})
    with pytest.raises(ConfigurationError, match="durable_slot must be true or false"):
        WalEx.from_env({"WALEX_PUBLICATION": "p", "WALEX_DURABLE_SLOT": "maybe"})


@pytest.fixture
def handlers_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"cfg_handlers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            SEEN = []
            def on_todo(events):
                SEEN.append(("todo", [e.new_record["id"] for e in events]))
            def on_one(event):
                SEEN.append(("one", event.new_record["id"]))
            def audit(event):
                SEEN.append(("audit", event.new_record["id"]))
            def not_seven(event):
                return event.new_record["id"] != 7
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "walex.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_toml_file_with_handlers(tmp_path: Path, handlers_module: str) -> None:
    path = write(
        tmp_path,
        f"""
        name = "from_file"
        url = "postgresql://u@h/d"
        publication = ["events"]
        subscriptions = ["todo"]
        retries = 0

        [[handlers]]
        handler = "{handlers_module}:on_todo"
        table = "todo"
        type = "insert"
        where = "{handlers_module}:not_seven"
        functions = ["{handlers_module}:audit"]

        [[handlers]]
        handler = "{handlers_module}:on_one"
        table = "todo"
        type = "update"
        unwatched_fields = ["updated_at"]
        """,
    )
    app = WalEx.from_config(path, environ={"WALEX_RETRIES": "2"})
    assert app.settings.retries == 2  # the environment wins over the file
    assert app.settings.slot_name == "walex_from_file"
    run_events(app, make_insert("todo", {"id": 1}), make_insert("todo", {"id": 7}))
    seen = sys.modules[handlers_module].SEEN
    assert seen == [("todo", [1]), ("audit", 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('publication = "p"\npublicaton = 1', "unknown setting 'publicaton' in"),
        ('publication = "p"\nport = "x"', "port must be"),
        ("publication = [", "not valid TOML"),
        ('publication = "p"\n[[handlers]]\ntable = "t"', "handler is required"),
        ('publication = "p"\n[[handlers]]\nhandler = "nomodule_xyz:f"', "cannot import module"),
        ('publication = "p"\n[[handlers]]\nhandler = "os:nothing_here"', "has no 'nothing_here'"),
        ('publication = "p"\n[[handlers]]\nhandler = "os.path:join"\ntype = "upsert"', "type must"),
        ('publication = "p"\n[[handlers]]\nhandler = "os.path:join"\ncolour = 1', "unknown key"),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        WalEx.from_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read the settings file"):
        WalEx.from_config(tmp_path / "nope.toml")


def test_destinations_from_file(tmp_path: Path) -> None:
    pytest.importorskip("walex.destinations")
    out = tmp_path / "out.jsonl"
    path = write(
        tmp_path,
        f"""
        publication = "p"
        [[destinations]]
        type = "file"
        path = "{out}"
        tables = ["todo"]
        types = ["insert"]
        """,
    )
    app = WalEx.from_config(path)
    (route,) = app._routes
    assert route.destination is not None
    assert route.types == {"insert"}


async def test_destination_tables_in_a_file_take_shell_patterns(tmp_path: Path) -> None:
    """docs/destinations.md promises shell patterns: "order_*" is not a literal name."""
    pytest.importorskip("walex.destinations")
    out = tmp_path / "out.jsonl"
    path = write(
        tmp_path,
        f"""
        publication = "p"
        [[destinations]]
        type = "file"
        path = "{out}"
        tables = ["order_*"]
        """,
    )
    app = WalEx.from_config(path)
    (route,) = app._routes
    assert route.destination is not None
    await dispatch(
        app,
        make_insert("order_items", {"id": 1}),
        make_insert("orders", {"id": 2}),
        make_insert("app.order_lines", {"id": 3}),
    )
    await route.destination.close()
    assert [line["table"] for line in map(json.loads, out.read_text().splitlines())] == [
        "order_items"
    ]


async def test_a_configured_app_runs_against_postgres(
    db: Database, tmp_path: Path, handlers_module: str
) -> None:
    from tests.helpers import seed_tables, until

    pub = seed_tables(db)
    path = write(
        tmp_path,
        f"""
        name = "{db.unique("cfg")}"
        publication = "{pub}"
        [[handlers]]
        handler = "{handlers_module}:on_todo"
        table = "todo"
        type = "insert"
        """,
    )
    app = WalEx.from_config(path, environ={"WALEX_URL": db.dsn})
    seen = sys.modules[handlers_module].SEEN
    async with app:
        db.execute("INSERT INTO todo (id) VALUES (3)")
        await until(lambda: len(seen) >= 1)
    assert seen == [("todo", [3])]


async def test_password_not_in_connection_errors_or_logs(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    port = db.server.port
    app = WalEx(
        name=db.unique("pw"),
        hostname="127.0.0.1",
        port=1 if port != 1 else 2,  # nothing listens there
        username="postgres",
        password="hunter2-secret",
        database=db.name,
        publication="p",
        connect_timeout=5,
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(walex.errors.ConnectionFailed) as info:
        await app.start()
    assert "hunter2-secret" not in str(info.value)
    assert "hunter2-secret" not in repr(info.value)
    assert "hunter2-secret" not in caplog.text


def test_every_engine_option_can_be_set_for_an_app() -> None:
    import inspect

    from walex.config import ENGINE_OPTIONS

    params = set(inspect.signature(walex.connect).parameters)
    # The app sets these itself (from url/hostname..., publication, slot_name, durable_slot).
    own = {"dsn", "publication", "slot", "durable"}
    assert set(ENGINE_OPTIONS) == params - own


def test_the_delivery_window_is_a_setting() -> None:
    app = WalEx(publication="p", window_events=100, window_bytes=1 << 20)
    assert (app.settings.window_events, app.settings.window_bytes) == (100, 1 << 20)
    default = WalEx(publication="p").settings
    assert (default.window_events, default.window_bytes) == (20_000, 8 << 20)
    with pytest.raises(ConfigurationError, match="window_events must be"):
        WalEx(publication="p", window_events=0)
    env = WalEx.from_env({"WALEX_PUBLICATION": "p", "WALEX_WINDOW_BYTES": "4096"})
    assert env.settings.window_bytes == 4096

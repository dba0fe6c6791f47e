"""Misconfiguration is a typed error, raised before streaming, that says what to do.

Each test sets up one thing wrong (a server, a role, a slot, a setting) and
checks the exception's type and the remedy its message gives. Settings that
the shared clusters must not change (``wal_level``, ``max_replication_slots``,
``max_slot_wal_keep_size``, ``pg_hba.conf``) get small clusters of their own,
one per combination and Postgres version, shared by this module's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import walex
from tests.fix_pg import Database, unique_name
from tests.streams import collect
from walex import errors
from walex.embedded import EmbeddedPostgres
from walex.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionFailed,
    NoFreeReplicationSlots,
    PublicationNotFound,
    ReplicationNotPermitted,
    ServerTooOld,
    SlotInUse,
    SlotInvalidated,
    SlotNotFound,
    WalexError,
    WalLevelNotLogical,
)
from walex.replication import ReplicationConnection, replication_conninfo

# A role of the "limits" cluster that pg_hba.conf makes log in with
# scram-sha-256, and its password.
_PW_ROLE = "walex_pw"
_PASSWORD = "s3cret-Pa55"
# A role that pg_hba.conf of the "limits" cluster turns away.
_REJECTED_ROLE = "walex_rejected"


# -- helpers -----------------------------------------------------------------


def _sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _with(dsn: str, **params: str) -> str:
    """*dsn* with some parameters replaced (EmbeddedPostgres.dsn cannot replace user)."""
    return make_conninfo(dsn, **params)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(0.05)


def _assert_left_nothing(dsn: str) -> None:
    """No slot of the database and no session of walex's remain on the server."""
    assert (
        _sql(dsn, "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")
        == []
    )

    def gone() -> bool:
        rows = _sql(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'walex%'"
            " AND datname = current_database()",
        )
        return rows == []

    _wait_until(gone, "walex's connections are closed", 5)


@contextlib.contextmanager
def _database(server: EmbeddedPostgres, prefix: str) -> Iterator[str]:
    """A fresh database on a dedicated cluster; yields its dsn, drops it after."""
    name = unique_name(prefix)
    dsn = server.create_database(name)
    try:
        yield dsn
    finally:
        server.drop_database(name)


def _table_and_publication(dsn: str, pub: str = "pub") -> None:
    _sql(dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    _sql(dsn, f'CREATE PUBLICATION "{pub}" FOR TABLE t')


async def _open_fails(stream: walex.Stream) -> None:
    """Open *stream*, which must fail; fail the test if streaming starts."""
    async with asyncio.timeout(30):
        await stream.open()
    await stream.aclose()
    pytest.fail("the stream opened, but an error was expected")


async def _connect_and_open(dsn: str, **options: Any) -> None:
    """Make a stream and open it, which must fail."""
    await _open_fails(walex.connect(dsn, **options))


# -- dedicated clusters --------------------------------------------------------


def _add_password_rules(server: EmbeddedPostgres) -> None:
    """Put a scram-sha-256 rule for one role, and a reject rule for another,
    before initdb's trust lines.

    (A logical replication connection matches the rules of its database,
    not those of ``replication``: these rules cover both of walex's connections.)
    """
    _sql(server.dsn(), f"CREATE ROLE {_PW_ROLE} LOGIN REPLICATION PASSWORD '{_PASSWORD}'")
    _sql(server.dsn(), f"CREATE ROLE {_REJECTED_ROLE} LOGIN REPLICATION")
    hba = Path(server.data_dir) / "pg_hba.conf"
    rules = (
        f"host all {_PW_ROLE} 127.0.0.1/32 scram-sha-256\n"
        f"host all {_REJECTED_ROLE} 127.0.0.1/32 reject\n"
    )
    # Rewritten in place, so that the file keeps its owner (the server's user).
    hba.write_text(rules + hba.read_text())
    _sql(server.dsn(), "SELECT pg_reload_conf()")

    def applied() -> bool:
        try:
            _sql(_with(server.dsn(), user=_PW_ROLE, password="wrong"), "SELECT 1")
        except psycopg.OperationalError as exc:
            return "authentication failed" in str(exc)
        return False

    _wait_until(applied, "pg_hba.conf is reloaded")


@pytest.fixture
def limits_pg(pg_server: EmbeddedPostgres, clusters: Callable[..., EmbeddedPostgres]) -> Any:
    """A logical cluster with 2 slots, 1MB of WAL kept for slots, and password rules."""
    return clusters(
        pg_server,
        {
            "max_replication_slots": "2",
            "max_wal_senders": "10",
            "max_slot_wal_keep_size": "1MB",
        },
        _add_password_rules,
    )


# -- the server is not ready -----------------------------------------------------


async def test_wal_level_not_logical(replica_pg: EmbeddedPostgres) -> None:
    with _database(replica_pg, "wal_level") as dsn:
        _table_and_publication(dsn)
        stream = walex.connect(dsn, publication="pub", slot="orders", durable=True)
        with pytest.raises(WalLevelNotLogical) as info:
            await _open_fails(stream)
        message = str(info.value)
        assert "ALTER SYSTEM SET wal_level" in message
        assert "'replica'" in message
        assert "restart" in message
        assert isinstance(info.value, errors.ServerNotReady)
        assert not stream.connected
        _assert_left_nothing(dsn)


async def test_publication_not_found(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    present, missing = db.unique("pub_here"), db.unique("pub_missing")
    db.execute(f"CREATE PUBLICATION {present} FOR TABLE t")
    stream = walex.connect(db.dsn, publication=[present, missing])
    with pytest.raises(PublicationNotFound) as info:
        await _open_fails(stream)
    message = str(info.value)
    assert missing in message
    assert present not in message
    assert f'CREATE PUBLICATION "{missing}"' in message
    assert db.name in message
    _assert_left_nothing(db.dsn)


async def test_slot_not_found_without_create_slot(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    stream = walex.connect(db.dsn, publication=pub, slot=slot, durable=True, create_slot=False)
    with pytest.raises(SlotNotFound) as info:
        await _open_fails(stream)
    message = str(info.value)
    assert slot in message
    assert f"pg_create_logical_replication_slot('{slot}', 'pgoutput')" in message
    assert isinstance(info.value, errors.SlotError)
    # It did not make the slot it was told not to make.
    _assert_left_nothing(db.dsn)
    # The remedy works: with the slot made as the message says, it streams.
    db.execute(f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    async with walex.connect(
        db.dsn, publication=pub, slot=slot, durable=True, create_slot=False
    ) as stream:
        db.execute("INSERT INTO t VALUES (1)")
        events = await collect(stream, 1)
    assert [e.new_record for e in events] == [{"id": 1}]


async def test_role_without_replication(db: Database) -> None:
    pub, role = db.unique("pub"), db.unique("no_repl")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    db.execute(f"CREATE ROLE {role} LOGIN")
    try:
        dsn = _with(db.dsn, user=role)
        stream = walex.connect(dsn, publication=pub)
        with pytest.raises(ReplicationNotPermitted) as info:
            await _open_fails(stream)
        message = str(info.value)
        assert role in message
        assert "ALTER ROLE" in message
        assert "REPLICATION" in message
        _assert_left_nothing(db.dsn)
        # The statement in the message is the remedy: run it, and streaming works.
        statement = re.search(r"ALTER ROLE [^;]+;", message)
        assert statement is not None, message
        db.execute(statement.group(0))
        async with walex.connect(dsn, publication=pub) as stream:
            db.execute("INSERT INTO t VALUES (7)")
            events = await collect(stream, 1)
        assert [e.new_record for e in events] == [{"id": 7}]
    finally:
        _wait_until(
            lambda: not db.fetch("SELECT 1 FROM pg_stat_activity WHERE usename = %s", [role]),
            f"the sessions of {role} end",
            5,
        )
        db.execute(f"DROP ROLE {role}")


async def test_no_free_replication_slots(limits_pg: EmbeddedPostgres) -> None:
    with _database(limits_pg, "no_free_slots") as dsn:
        _table_and_publication(dsn)
        assert _sql(dsn, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
        for name in ("taken_1", "taken_2"):
            _sql(dsn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [name])
        for durable in (True, False):
            stream = walex.connect(dsn, publication="pub", slot="third", durable=durable)
            with pytest.raises(NoFreeReplicationSlots) as info:
                await _open_fails(stream)
            message = str(info.value)
            assert "max_replication_slots" in message
            assert "drop unused" in message
            assert isinstance(info.value, errors.ServerNotReady)
        # An existing slot needs no free one.
        async with walex.connect(dsn, publication="pub", slot="taken_1", durable=True) as s:
            _sql(dsn, "INSERT INTO t VALUES (1)")
            assert [e.new_record for e in await collect(s, 1)] == [{"id": 1}]
        # Dropping an unused slot, as the message says, makes room.
        _sql(dsn, "SELECT pg_drop_replication_slot('taken_2')")
        async with walex.connect(dsn, publication="pub", slot="third", durable=True) as s:
            _sql(dsn, "INSERT INTO t VALUES (2)")
            assert [e.new_record for e in await collect(s, 1)] == [{"id": 2}]


async def test_invalidated_slot(limits_pg: EmbeddedPostgres) -> None:
    with _database(limits_pg, "lost_slot") as dsn:
        _table_and_publication(dsn)
        _sql(dsn, "SELECT pg_create_logical_replication_slot('behind', 'pgoutput')")
        # Write and switch WAL segments until max_slot_wal_keep_size (1MB)
        # makes a checkpoint give up the WAL the slot still needs.
        status = None
        for i in range(30):
            _sql(dsn, "INSERT INTO t VALUES (%s)", [i])
            _sql(dsn, "SELECT pg_switch_wal()")
            _sql(dsn, "CHECKPOINT")
            [(status,)] = _sql(
                dsn, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'behind'"
            )
            if status == "lost":
                break
        assert status == "lost", "could not make the slot lose its WAL"
        stream = walex.connect(dsn, publication="pub", slot="behind", durable=True)
        with pytest.raises(SlotInvalidated) as info:
            await _open_fails(stream)
        message = str(info.value)
        assert "lost" in message
        assert "pg_drop_replication_slot('behind')" in message
        assert "max_slot_wal_keep_size" in message
        assert not stream.connected
        # The slot is left for the user to look at and drop: walex does not drop it.
        assert _sql(dsn, "SELECT slot_name FROM pg_replication_slots") == [("behind",)]
        # Dropped as the message says, the slot is made again and streams.
        _sql(dsn, "SELECT pg_drop_replication_slot('behind')")
        async with walex.connect(dsn, publication="pub", slot="behind", durable=True) as s:
            _sql(dsn, "INSERT INTO t VALUES (100)")
            assert [e.new_record for e in await collect(s, 1)] == [{"id": 100}]


# -- connecting ------------------------------------------------------------------


async def test_server_unreachable_fails_fast() -> None:
    dsn = f"host=127.0.0.1 port={_free_port()} user=postgres dbname=app"
    stream = walex.connect(dsn, publication="pub", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        await _open_fails(stream)
    assert time.monotonic() - started < 2
    assert not isinstance(info.value, AuthenticationFailed)
    assert "check the host, port" in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.Error)


async def test_server_that_never_answers_times_out() -> None:
    # A socket that accepts connections but never says a word.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=app"
        stream = walex.connect(dsn, publication="pub", connect_timeout=2)
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            await _open_fails(stream)
        elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 6, elapsed
    assert not isinstance(info.value, AuthenticationFailed)
    assert "check the host, port" in str(info.value)


async def test_authentication_failed(limits_pg: EmbeddedPostgres) -> None:
    with _database(limits_pg, "auth") as dsn:
        _table_and_publication(dsn)
        for password in ("wrong", None):
            params = {"user": _PW_ROLE} | ({"password": password} if password else {})
            stream = walex.connect(_with(dsn, **params), publication="pub")
            with pytest.raises(AuthenticationFailed) as info:
                await _open_fails(stream)
            message = str(info.value)
            assert "check the user name and password" in message
            assert isinstance(info.value, ConnectionFailed)
            assert isinstance(info.value.__cause__, psycopg.Error)
        # With the right password the same role streams.
        right = _with(dsn, user=_PW_ROLE, password=_PASSWORD)
        async with walex.connect(right, publication="pub") as stream:
            _sql(dsn, "INSERT INTO t VALUES (1)")
            assert [e.new_record for e in await collect(stream, 1)] == [{"id": 1}]


async def test_unknown_user(db: Database) -> None:
    """A role the server does not know: the same clear error on either connection."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    nobody = _with(db.dsn, user="walex_nobody")
    stream = walex.connect(nobody, publication=pub)
    with pytest.raises(AuthenticationFailed) as info:
        await _open_fails(stream)
    assert '"walex_nobody"' in str(info.value)
    assert "check the user name" in str(info.value)
    assert "check the host" not in str(info.value)
    assert isinstance(info.value.__cause__, psycopg.Error)
    # The replication connection (opened on its own when the stream reconnects).
    with pytest.raises(AuthenticationFailed) as direct:
        await ReplicationConnection.connect(replication_conninfo(nobody), 10)
    assert '"walex_nobody"' in str(direct.value)
    assert "check the user name" in str(direct.value)


async def test_ssl_required_but_not_offered(db: Database) -> None:
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    tls = _with(db.dsn, sslmode="require")
    with pytest.raises(ConnectionFailed) as info:
        await _open_fails(walex.connect(tls, publication=pub))
    assert "SSL was required" in str(info.value)
    assert "sslmode" in str(info.value)
    assert "check the host" not in str(info.value)
    with pytest.raises(ConnectionFailed) as direct:
        await ReplicationConnection.connect(replication_conninfo(tls), 10)
    assert "sslmode" in str(direct.value)


async def test_turned_away_by_pg_hba(limits_pg: EmbeddedPostgres) -> None:
    with _database(limits_pg, "hba") as dsn:
        _table_and_publication(dsn)
        rejected = _with(dsn, user=_REJECTED_ROLE)
        stream = walex.connect(rejected, publication="pub")
        with pytest.raises(ConnectionFailed) as info:
            await _open_fails(stream)
        assert not isinstance(info.value, AuthenticationFailed)
        assert "pg_hba.conf rejects connection" in str(info.value)
        assert "allow this host, user and database in pg_hba.conf" in str(info.value)
        with pytest.raises(ConnectionFailed) as direct:
            await ReplicationConnection.connect(replication_conninfo(rejected), 10)
        assert "allow this host, user and database in pg_hba.conf" in str(direct.value)


# -- the slot is busy --------------------------------------------------------------


async def test_slot_in_use(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as first:
        db.execute("INSERT INTO t VALUES (1)")
        assert [e.new_record for e in await collect(first, 1)] == [{"id": 1}]
        [(pid,)] = db.fetch(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [slot]
        )
        assert pid is not None
        second = walex.connect(
            db.dsn, publication=pub, slot=slot, durable=True, wait_for_slot=False
        )
        with pytest.raises(SlotInUse) as info:
            await _open_fails(second)
        assert info.value.pid == pid
        assert str(pid) in str(info.value)
        assert slot in str(info.value)
        assert not second.connected
        # The first consumer goes on undisturbed.
        db.execute("INSERT INTO t VALUES (2)")
        assert [e.new_record for e in await collect(first, 1)] == [{"id": 2}]
        assert db.fetch(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [slot]
        ) == [(pid,)]


async def test_standby_waits_for_the_slot_then_takes_over(db: Database) -> None:
    pub, slot = db.unique("pub"), db.unique("slot")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    standby_events: list[walex.Event] = []
    standby_open = asyncio.Event()

    async def standby() -> None:
        async with walex.connect(
            db.dsn,
            publication=pub,
            slot=slot,
            durable=True,
            wait_for_slot=True,
            standby_retry=0.2,
        ) as stream:
            standby_open.set()
            standby_events.extend(await collect(stream, 1, timeout=20))

    async with walex.connect(db.dsn, publication=pub, slot=slot, durable=True) as first:
        db.execute("INSERT INTO t VALUES (1)")
        assert [e.new_record for e in await collect(first, 1)] == [{"id": 1}]
        task = asyncio.create_task(standby())
        try:
            await asyncio.sleep(1.0)  # five checks of the slot
            db.execute("INSERT INTO t VALUES (2)")
            assert [e.new_record for e in await collect(first, 1)] == [{"id": 2}]
            await asyncio.sleep(0.5)
            # Waiting: not crashed, not streaming, nothing received.
            assert not task.done(), task.exception() if task.done() else None
            assert not standby_open.is_set()
            assert standby_events == []
        except BaseException:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
    # The first consumer has gone, having confirmed 1 and 2.
    db.execute("INSERT INTO t VALUES (3)")
    async with asyncio.timeout(20):
        await task
    assert standby_open.is_set()
    assert [e.new_record for e in standby_events] == [{"id": 3}]


# -- settings ----------------------------------------------------------------------

_UNREACHABLE = "<a server where nothing listens>"


@pytest.mark.parametrize(
    ("dsn", "options", "phrase"),
    [
        (_UNREACHABLE, {"slot": "Bad-Name"}, "lower-case letters, digits and underscores"),
        (_UNREACHABLE, {"slot": "x" * 64}, "1 to 63"),
        (_UNREACHABLE, {"durable": True}, "a durable slot needs a name"),
        (_UNREACHABLE, {"publication": []}, "publication must be"),
        (_UNREACHABLE, {"publication": ""}, "publication must be"),
        (_UNREACHABLE, {"publication": ["ok", ""]}, "publication must be"),
        (_UNREACHABLE, {"max_batch_events": 0}, "max_batch_events"),
        (_UNREACHABLE, {"origin": "bogus"}, "origin must be"),
        (_UNREACHABLE, {"start_lsn": "xyz"}, "start_lsn"),
        ("host=127.0.0.1 port", {}, "invalid connection string"),
        ("host=127.0.0.1 password='unterminated", {}, "invalid connection string"),
        ("postgresql://[::1/app", {}, "invalid connection string"),
        (_UNREACHABLE + " replication=database", {}, "leave 'replication' out"),
    ],
    ids=[
        "bad_slot_name",
        "long_slot_name",
        "durable_without_slot",
        "no_publications",
        "empty_publication",
        "empty_publication_in_list",
        "max_batch_events_0",
        "bad_origin",
        "bad_start_lsn",
        "dsn_missing_equals",
        "dsn_unterminated_quote",
        "dsn_bad_uri",
        "dsn_with_replication",
    ],
)
async def test_malformed_settings_fail_before_connecting(
    dsn: str, options: dict[str, Any], phrase: str
) -> None:
    # Nothing listens there: a connection attempt would be a ConnectionFailed.
    dsn = dsn.replace(_UNREACHABLE, f"host=127.0.0.1 port={_free_port()} user=postgres dbname=app")
    options = {"publication": "pub", **options}
    with pytest.raises(ConfigurationError) as info:
        await _connect_and_open(dsn, connect_timeout=2, **options)
    assert isinstance(info.value, ValueError)
    assert phrase in str(info.value)


async def test_origin_needs_postgres_16(db: Database) -> None:
    if db.major >= 16:
        pytest.skip("origin= is supported from Postgres 16 on")
    pub = db.unique("pub")
    db.execute("CREATE TABLE t (id int PRIMARY KEY)")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    stream = walex.connect(db.dsn, publication=pub, origin="none")
    with pytest.raises(ServerTooOld) as info:
        await _open_fails(stream)
    assert "origin= needs Postgres 16" in str(info.value)
    assert "Leave the option out" in str(info.value)
    _assert_left_nothing(db.dsn)


# -- the tree ----------------------------------------------------------------------


def test_every_error_has_one_root() -> None:
    assert errors.__all__, "walex.errors exports its exceptions"
    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert len(classes) >= 20
    for cls in classes:
        assert issubclass(cls, WalexError), cls
    # The rest are the translation functions, nothing else.
    assert {n for n in errors.__all__ if not isinstance(getattr(errors, n), type)} == {
        "connection_failure",
        "conninfo_error",
        "is_transient",
        "mask_dsn",
        "scrub",
        "translate",
    }
    assert issubclass(ConfigurationError, ValueError)
    assert walex.WalexError is WalexError


def test_the_documented_tree_is_the_real_one() -> None:
    """The tree drawn in errors.py's docstring matches the classes."""
    doc = errors.__doc__ or ""
    assert "::" in doc
    drawing = doc.split("::", 1)[1]
    parents: dict[int, str] = {}
    seen: list[str] = []
    for line in drawing.splitlines():
        match = re.match(r"^([\s│├└─]*)([A-Z]\w+)", line)
        if match is None:
            continue
        name = match.group(2)
        assert hasattr(errors, name), f"{name} is drawn but not defined"
        depth = len(match.group(1)) // 4
        parents[depth] = name
        if seen:
            parent = parents[depth - 1]
            assert getattr(errors, name).__bases__[0] is getattr(errors, parent), (
                f"{name} is drawn under {parent}"
            )
        seen.append(name)
    assert seen[0] == "WalexError"
    exported = [n for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert sorted(seen) == sorted(exported), "every exception is drawn, once"

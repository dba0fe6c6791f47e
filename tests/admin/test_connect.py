"""``walex.admin.connect``: failures become walex's errors, and never show the password."""

from __future__ import annotations

import pytest

from tests.fix_pg import Database
from tests.helpers import HOSTILE
from walex.admin import connect_sql, connection_error
from walex.errors import AuthenticationFailed, ConnectionFailed


@pytest.mark.parametrize(("dsn", "says"), HOSTILE)
async def test_no_password_in_the_message(dsn: str, says: str) -> None:
    with pytest.raises(ConnectionFailed) as info:
        await connect_sql(dsn, connect_timeout=2)
    message = str(info.value)
    assert message.startswith(says), message
    for piece in ("s3c", "cret", "3cr"):
        assert piece not in message, message
    assert "\n" not in message


async def test_a_short_password_inside_a_quoted_url_is_masked() -> None:
    with pytest.raises(ConnectionFailed) as info:
        await connect_sql('postgresql://app:a"b@[::1/app', connect_timeout=2)
    assert '"postgresql://app:***@[::1/app"' in str(info.value)


async def test_a_refused_login_is_an_authentication_error(db: Database) -> None:
    role = db.unique("nobody")
    with pytest.raises(AuthenticationFailed) as info:
        await connect_sql(f"{db.dsn} user={role} password=s3cret", connect_timeout=5)
    assert role in str(info.value)
    assert "s3cret" not in str(info.value)


async def test_connects_and_names_itself(db: Database) -> None:
    conn = await connect_sql(db.dsn, application_name="walex-test")
    try:
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert await cur.fetchone() == ("walex-test",)
        assert conn.autocommit
    finally:
        await conn.close()


def test_connection_error_masks_the_dsn_it_is_given() -> None:
    error = connection_error(
        Exception("failed to resolve host 'w0rd': oops"), "postgresql://u:p@ss@w0rd@h/db"
    )
    assert "w0rd" not in str(error)
    assert isinstance(error, ConnectionFailed)


async def test_tcp_keepalives_unless_the_connection_string_sets_them(db: Database) -> None:
    conn = await connect_sql(db.dsn)
    try:
        assert "keepalives_idle=30" in conn.info.dsn
    finally:
        await conn.close()
    conn = await connect_sql(f"{db.dsn} keepalives_idle=7")
    try:
        assert "keepalives_idle=7" in conn.info.dsn
        assert "keepalives_idle=30" not in conn.info.dsn
    finally:
        await conn.close()


async def test_no_server_named_says_libpq_tried_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("PGHOST", "PGHOSTADDR", "PGSERVICE", "PGPORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConnectionFailed) as info:
        await connect_sql("port=1 dbname=app", connect_timeout=2)
    assert "no server was named" in str(info.value)
    with pytest.raises(ConnectionFailed) as info:
        await connect_sql("host=127.0.0.1 port=1 dbname=app", connect_timeout=2)
    assert "no server was named" not in str(info.value)

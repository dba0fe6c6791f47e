"""``walex.admin.connect``: failures become walex's errors, and never show the password."""

from __future__ import annotations

import pytest

from tests.fix_pg import Database
from walex.admin import connect_sql, connection_error
from walex.errors import AuthenticationFailed, ConnectionFailed

# Connection strings libpq cannot read, or that fail, each with a password
# holding "s3cret"; the second item is the start of walex's message.
HOSTILE = [
    ("postgresql://app:50%off-s3cret@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:s3cret@[127.0.0.1/app", "invalid connection string: end of string"),
    ('postgresql://app:s3cret"q@[::1/app', "invalid connection string: end of string"),
    ("postgresql://app:%zzs3cret@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:s3cret€%@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:p@s3cret:x@127.0.0.1:1/app", "could not connect to the server"),
    ("postgresql://app@127.0.0.1:1/app?password=s3cret%zz", "invalid connection string: invalid"),
    ("host=127.0.0.1 port=1 password=s3cret%zz foo=bar", "invalid connection string: invalid c"),
    ("postgresql://app:s3cret@127.0.0.1:1/app", "could not connect to the server"),
    ("host=127.0.0.1 port=1 password='s3 cret' user=app", "could not connect to the server"),
]


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

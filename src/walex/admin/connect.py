"""The normal (SQL) connection that the checks, set-up and commands run over.

It owns opening that connection and turning psycopg's connection failures
into walex's errors (through :func:`walex.errors.connection_failure`), with
the password kept out of their text; it runs no query and knows nothing
about replication.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import ConnectionFailed, connection_failure, scrub

__all__ = ["KEEPALIVES", "connect_sql", "connection_error"]

#: TCP keepalives on walex's connections unless the connection string sets
#: its own: a link that died without a FIN or RST is noticed within about a
#: minute even while nothing is sent (libpq ignores them on Unix sockets).
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


async def connect_sql(
    dsn: str, connect_timeout: float = 30.0, application_name: str = "walex-catalog"
) -> psycopg.AsyncConnection[Any]:
    """A normal autocommit connection, with connection errors made walex's.

    *application_name* names it in ``pg_stat_activity`` (the commands use
    their own, such as ``walex-tail``).

    Raises:
        ConnectionFailed: the server cannot be reached, refuses the login, or
            *dsn* is not a connection string. The message never holds the
            password, even of a malformed *dsn*.
    """
    try:
        params = conninfo_to_dict(dsn)
        # TCP keepalives unless the connection string sets its own: a
        # silent dead link is noticed even while the connection is idle.
        conninfo = make_conninfo(dsn, **{k: v for k, v in KEEPALIVES.items() if k not in params})
        return await psycopg.AsyncConnection.connect(
            conninfo,
            autocommit=True,
            connect_timeout=max(1, int(connect_timeout)),
            application_name=application_name,
        )
    except psycopg.OperationalError as exc:
        raise connection_error(exc, dsn) from exc
    except psycopg.ProgrammingError as exc:
        # libpq's reason quotes the part it could not read: for a URL with a
        # bad percent-escape in the password, that part is the password.
        reason = " ".join(scrub(str(exc), dsn).split())
        raise ConnectionFailed(f"invalid connection string: {reason}") from exc


def connection_error(exc: Exception, dsn: str | None = None) -> ConnectionFailed:
    """Translate a psycopg connection failure.

    Args:
        exc: what psycopg raised.
        dsn: the connection string tried; pieces of its password that
            libpq quotes in its message (a host read out of a password
            with an ``@`` in it) are masked too.
    """
    return connection_failure(str(exc), dsn)

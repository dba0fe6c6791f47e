"""The normal (SQL) connection that the checks, set-up and commands run over.

It owns opening that connection and turning psycopg's connection failures
into walex's errors (through :func:`walex.errors.connection_failure`), with
the password kept out of their text; it runs no query and knows nothing
about replication.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

import psycopg

from ..errors import ConnectionFailed, connection_failure, mask_dsn, scrub

__all__ = ["connect_sql", "connection_error"]


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
        return await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, int(connect_timeout)),
            application_name=application_name,
        )
    except psycopg.OperationalError as exc:
        raise connection_error(exc, dsn) from exc
    except psycopg.ProgrammingError as exc:
        # libpq's reason quotes the part it could not read: for a URL with a
        # bad percent-escape in the password, that part is the password.
        reason = " ".join(_hide_password(str(exc), dsn).split())
        raise ConnectionFailed(f"invalid connection string: {reason}") from exc


def connection_error(exc: Exception, dsn: str | None = None) -> ConnectionFailed:
    """Translate a psycopg connection failure.

    Args:
        exc: what psycopg raised.
        dsn: the connection string tried; pieces of its password that
            libpq quotes in its message (a host read out of a password
            with an ``@`` in it) are masked too.
    """
    message = str(exc) if dsn is None else _hide_password(str(exc), dsn)
    return connection_failure(message)


# A value libpq quotes in its message: "token" or 'host'.
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'")
_CONNINFO_PASSWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)")
_URL_PASSWORD = re.compile(r"[?&]password=([^&]*)")
# Shorter secrets are left to the quoted-token rule: replacing a word of two
# or three letters everywhere would mangle the message and hide nothing more.
_BARE_MIN = 4


def _passwords(dsn: str) -> set[str]:
    """The password(s) *dsn* holds, read as a person wrote them, even if malformed."""
    found: list[str] = []
    if "://" in dsn:
        rest = dsn.split("://", 1)[1]
        netloc = rest.partition("/")[0]
        at = netloc.rfind("@")
        if at != -1 and ":" in netloc[:at]:
            found.append(netloc[:at].split(":", 1)[1])
        found.extend(_URL_PASSWORD.findall(dsn))
    for raw in _CONNINFO_PASSWORD.findall(dsn):
        if raw.startswith("'"):
            raw = re.sub(r"\\(.)", r"\1", raw[1:].removesuffix("'"))
        found.append(raw)
    # libpq may quote the text as written or decoded.
    return {form for secret in found for form in (secret, unquote(secret)) if form}


def _hide_password(text: str, dsn: str) -> str:
    """*text* with every URL and ``password=`` masked, and anything of *dsn*'s password."""
    # libpq may quote the whole string: mask it as one, before its pieces.
    text = scrub(text.replace(dsn, mask_dsn(dsn)) if dsn else text)
    secrets = _passwords(dsn)
    if not secrets:
        return text

    def hide(match: re.Match[str]) -> str:
        token = match.group(1) if match.group(1) is not None else match.group(2)
        if token and any(token in secret or secret in token for secret in secrets):
            return f"{match.group(0)[0]}***{match.group(0)[0]}"
        return match.group(0)

    text = _QUOTED.sub(hide, text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= _BARE_MIN:
            text = text.replace(secret, "***")
    return text

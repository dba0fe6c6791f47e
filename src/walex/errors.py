"""walex's exceptions: one tree, one root, and the one place errors are translated.

Every error walex raises is a :class:`WalexError`. Errors in settings are
found before anything connects; they are also :class:`ValueError`.
Errors from psycopg and libpq are translated where they cross into walex, by
:func:`translate` (a server error, by its SQLSTATE) and
:func:`connection_failure` (a failed connection, which carries no SQLSTATE:
only libpq's text), with the original kept as ``__cause__``.

::

    WalexError
    ├── ConfigurationError (also ValueError)   a setting is wrong; says which
    ├── ConnectionFailed                       cannot reach or log in to the server
    │   └── AuthenticationFailed
    ├── ServerNotReady                         the server cannot stream changes yet
    │   ├── WalLevelNotLogical
    │   ├── PublicationNotFound
    │   ├── ReplicationNotPermitted            the role lacks REPLICATION
    │   ├── NoFreeReplicationSlots
    │   └── ServerTooOld
    ├── SlotError
    │   ├── SlotNotFound                       create_slot=False and no such slot
    │   ├── SlotInvalidated                    wal_status = lost: the WAL is gone
    │   ├── SlotInUse                          another process streams from it
    │   └── SlotLost                           a temporary slot went away: a gap
    ├── StreamError                            the replication stream broke
    │   ├── DecodeError                        a pgoutput message walex cannot read
    │   └── ServerError                        the server answered a command with an error
    ├── HandlerError                           user code failed (the error policy gave up)
    ├── Abandoned                              a stop ended a wait to retry: not handled
    ├── ForcedStop                             a forced stop left a transaction unconfirmed
    ├── DestinationError                       a destination could not deliver
    └── EmbeddedPostgresError                  the local throw-away Postgres failed
        └── PostgresNotFound
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

from psycopg.conninfo import conninfo_to_dict

from .lsn import LSN

if TYPE_CHECKING:
    from .events import Event

__all__ = [
    "Abandoned",
    "AuthenticationFailed",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "DestinationError",
    "EmbeddedPostgresError",
    "ForcedStop",
    "HandlerError",
    "NoFreeReplicationSlots",
    "PostgresNotFound",
    "PublicationNotFound",
    "ReplicationNotPermitted",
    "ServerError",
    "ServerNotReady",
    "ServerTooOld",
    "SlotError",
    "SlotInUse",
    "SlotInvalidated",
    "SlotLost",
    "SlotNotFound",
    "StreamError",
    "WalLevelNotLogical",
    "WalexError",
    "connection_failure",
    "conninfo_error",
    "is_transient",
    "mask_dsn",
    "scrub",
    "translate",
]


class WalexError(Exception):
    """The root of every error walex raises."""


class ConfigurationError(WalexError, ValueError):
    """A setting is missing or wrong. Raised before anything connects."""


class ConnectionFailed(WalexError):
    """The server cannot be reached, or refused the connection."""


class AuthenticationFailed(ConnectionFailed):
    """The server refused the user name or password."""


class ServerNotReady(WalexError):
    """The server is reachable but not set up to stream changes."""


class WalLevelNotLogical(ServerNotReady):
    """``wal_level`` is not ``logical``."""


class PublicationNotFound(ServerNotReady):
    """A publication named in the settings does not exist."""


class ReplicationNotPermitted(ServerNotReady):
    """The role may not open a replication connection."""


class NoFreeReplicationSlots(ServerNotReady):
    """Every replication slot (``max_replication_slots``) is taken."""


class ServerTooOld(ServerNotReady):
    """The server's version lacks a feature that was asked for."""


class SlotError(WalexError):
    """Something is wrong with the replication slot."""


class SlotNotFound(SlotError):
    """The slot does not exist and walex was told not to create it."""


class SlotInvalidated(SlotError):
    """The server removed WAL the slot still needed (``wal_status = lost``)."""


class SlotInUse(SlotError):
    """Another process streams from the slot.

    Attributes:
        pid: the server process that holds the slot, when known.
    """

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class SlotLost(SlotError):
    """A temporary slot went away with its connection.

    The changes committed between the old slot and a new one are not
    delivered; walex refuses to go on unless told it may (``allow_gap``).
    """


class StreamError(WalexError):
    """The replication stream failed while running."""


class DecodeError(StreamError):
    """A pgoutput message could not be decoded.

    Attributes:
        lsn: the WAL position of the message.
    """

    def __init__(self, message: str, lsn: LSN | None = None) -> None:
        where = f" at LSN {lsn}" if lsn is not None else ""
        super().__init__(f"{message}{where}")
        self.lsn = lsn


class ServerError(StreamError):
    """The server answered a replication command with an error.

    Attributes:
        sqlstate: the SQLSTATE code, when the server sent one.
    """

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class HandlerError(WalexError):
    """A handler (or destination) failed and the error policy gave up."""


class Abandoned(WalexError):
    """A stop was asked for while a handler or destination waited to retry.

    The batch in hand was not handled and must not be confirmed; it comes
    again after a restart. Raised by :class:`walex.routing.Dispatcher` (and
    ``walex.destinations.Deliverer.handle``); the app and
    ``walex.destinations.deliver`` take it as the end of a graceful stop.
    """


class ForcedStop(WalexError):
    """A forced stop (a second signal) cut a transaction short: it is not confirmed.

    It comes again when the app restarts. ``walex run`` exits with
    :attr:`exit_code` (3).
    """

    exit_code = 3


class DestinationError(WalexError):
    """A destination could not deliver events.

    Attributes:
        destination: the destination's name.
        retryable: whether sending again may succeed (a broken connection, a
            5xx answer) or not (a 4xx answer, a message the broker refuses).
        retry_after: how long the receiver asked us to wait, in seconds
            (``Retry-After``), if it did.
        failed: the events that were not accepted, when the destination knows
            which (those before them were); ``None`` means all of them.
        rejected: the events at the head of *failed* that the receiver
            refused for good (a 4xx answer to them); the error policy takes
            those, and the rest of *failed* is sent on. ``None``: the error
            is about all of *failed*.
    """

    def __init__(
        self,
        message: str,
        *,
        destination: str = "",
        retryable: bool = True,
        retry_after: float | None = None,
        failed: Sequence[Event] | None = None,
        rejected: Sequence[Event] | None = None,
    ) -> None:
        super().__init__(f"{destination}: {message}" if destination else message)
        self.destination = destination
        self.retryable = retryable
        self.retry_after = retry_after
        self.failed = failed
        self.rejected = rejected


class EmbeddedPostgresError(WalexError):
    """The local Postgres could not be found, set up, started or stopped."""


class PostgresNotFound(EmbeddedPostgresError):
    """No usable Postgres binaries are installed."""


# -- secrets out of messages ----------------------------------------------------

_CONNINFO_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\S+)")
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")


def mask_dsn(dsn: str) -> str:
    """*dsn* with its password replaced by ``***``, fit for logs and messages.

    Example:
        >>> mask_dsn("postgresql://app:s3cret@db/app")
        'postgresql://app:***@db/app'
    """
    if "://" in dsn:
        # A URL: userinfo is what lies between "//" and the last "@" before the path.
        scheme, rest = dsn.split("://", 1)
        netloc, sep, path = rest.partition("/")
        at = netloc.rfind("@")
        if at != -1 and ":" in netloc[:at]:
            user = netloc[:at].split(":", 1)[0]
            netloc = f"{user}:***{netloc[at:]}"
        masked = f"{scheme}://{netloc}{sep}{path}"
        # ?password=... in the query string.
        return re.sub(r"([?&]password=)[^&]*", r"\1***", masked)
    # key=value form; a quoted value may hold spaces and escaped quotes.
    return _CONNINFO_PASSWORD.sub(r"\1***", dsn)


def conninfo_error(exc: Exception, what: str = "connection string") -> ConfigurationError:
    """The error for a connection string that libpq cannot read.

    libpq's message quotes the part it stumbled on, which may be a password:
    only its reason is kept, never what it quotes.
    """
    reason = str(exc).split(":", 1)[0].strip()
    reason = re.sub(r'"[^"]{2,}"', '"…"', reason)  # what it quotes, even before a colon
    return ConfigurationError(
        f"invalid {what} ({reason}): write it as postgresql://user@host:port/db "
        "or as key=value pairs"
    )


# A value libpq quotes in its message: "token" or 'host'.
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'")
_CONNINFO_PASSWORD_VALUE = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)")
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
    for raw in _CONNINFO_PASSWORD_VALUE.findall(dsn):
        if raw.startswith("'"):
            raw = re.sub(r"\\(.)", r"\1", raw[1:].removesuffix("'"))
        found.append(raw)
    # libpq may quote the text as written or decoded.
    return {form for secret in found for form in (secret, unquote(secret)) if form}


def scrub(text: str, dsn: str | None = None) -> str:
    """*text* with the password of every URL and ``password=`` in it masked, and,
    when *dsn* is given, anything of *dsn*'s password (libpq quotes pieces of a
    malformed string in its messages: a bad percent-escape, a host read out of
    a password with an ``@`` in it).

    Every message walex shows that may hold a connection string passes here.
    """
    # libpq may quote the whole string: mask it as one, before its pieces.
    if dsn:
        text = text.replace(dsn, mask_dsn(dsn))
    text = _URL_IN_TEXT.sub(lambda m: mask_dsn(m.group(0)), text)
    text = _CONNINFO_PASSWORD.sub(r"\1***", text)
    if not dsn:
        return text
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


# -- translation ------------------------------------------------------------------
#
# One table from SQLSTATE to what it means for walex, used by both the SQL and
# the replication connection. A failed *connection* carries no SQLSTATE (libpq
# reports it as text), so connection_failure() reads libpq's words instead.

_OBJECT_IN_USE = "55006"
_NOT_IN_PREREQUISITE_STATE = "55000"
_UNDEFINED_OBJECT = "42704"
_CONFIG_LIMIT = "53400"
_TOO_MANY_CONNECTIONS = "53300"
_INSUFFICIENT_PRIVILEGE = "42501"

#: SQLSTATE → the walex error it becomes, and what to do about it.
SQLSTATES: dict[str, tuple[type[WalexError], str]] = {
    _OBJECT_IN_USE: (SlotInUse, "stop the other consumer, or use another slot name"),
    _CONFIG_LIMIT: (
        NoFreeReplicationSlots,
        "drop unused slots or raise max_replication_slots / max_wal_senders",
    ),
    _NOT_IN_PREREQUISITE_STATE: (
        SlotInvalidated,
        "drop the slot and start again (re-read the tables if you need every row)",
    ),
    _TOO_MANY_CONNECTIONS: (
        ServerNotReady,
        "raise max_wal_senders (or max_connections) and restart Postgres",
    ),
    _INSUFFICIENT_PRIVILEGE: (
        ReplicationNotPermitted,
        "grant the role what it lacks (ALTER ROLE ... WITH REPLICATION, as a superuser)",
    ),
    "28000": (AuthenticationFailed, "check the user name and password"),
    "28P01": (AuthenticationFailed, "check the user name and password"),
    "3D000": (ConnectionFailed, "check the database name"),
}

# SQLSTATE classes that end one connection, not the stream: a broken link
# (08), a server shutting down or restarting (57), a lack of resources (53).
_TRANSIENT_CLASSES = frozenset({"08", "57", "53"})


def is_transient(sqlstate: str | None) -> bool:
    """Whether an error with *sqlstate* ends this connection only (reconnect)
    rather than the stream. No SQLSTATE at all means the connection broke."""
    if not sqlstate:
        return True
    return sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate == _OBJECT_IN_USE


def translate(exc: ServerError, *, slot: str | None = None) -> WalexError:
    """The walex error for a server's error answer, by its SQLSTATE.

    Args:
        exc: the server's error (its message and SQLSTATE).
        slot: the slot the command was about, to name it.

    Returns:
        The error to raise (``from exc``); *exc* itself when walex knows no
        more than the server said.
    """
    state = exc.sqlstate or ""
    msg = str(exc)
    if state == _UNDEFINED_OBJECT and "publication" in msg:
        # The same SQLSTATE names a missing slot; the object type is only in the text.
        return PublicationNotFound(f"{msg}; create the publication (or run walex setup)")
    found = SQLSTATES.get(state)
    if found is None:
        return exc
    cls, fix = found
    what = f"slot {slot!r}: {msg}" if slot is not None and issubclass(cls, SlotError) else msg
    if cls is SlotInUse:
        pid = re.search(r"PID (\d+)", msg)
        return SlotInUse(f"{what}; {fix}", int(pid.group(1)) if pid else None)
    return cls(f"{what}; {fix}")


def connection_failure(message: str, dsn: str | None = None) -> ConnectionFailed:
    """The walex error for libpq's message about a failed connection.

    Shared by the SQL and the replication connections, so that one cause
    reads the same on both. The message is scrubbed of passwords (of *dsn*
    too, when given), and says so when *dsn* named no server and libpq
    tried its defaults.
    """
    # libpq's messages span lines ("\n\tIs the server running..."): one line reads
    # better in a log and on a terminal.
    error = _connection_failure(scrub(" ".join(message.split()), dsn))
    if dsn is not None and _no_server_named(dsn):
        error.args = (
            f"{error} (no server was named: no host in the connection string, no PGHOST "
            "or PGSERVICE, so libpq tried its default, the local Unix socket)",
        )
    return error


def _connection_failure(msg: str) -> ConnectionFailed:
    low = msg.lower()
    if "authentication failed" in low:
        return AuthenticationFailed(
            f"the server refused the login ({msg}); check the user name and password"
        )
    if "no password supplied" in low:
        return AuthenticationFailed(
            f"the server asks for a password ({msg}); check the user name and password: "
            "put the password in the connection string, in PGPASSWORD or in ~/.pgpass"
        )
    if "does not exist" in low and re.search(r'\brole "', low):
        return AuthenticationFailed(f"{msg}; check the user name")
    if "does not exist" in low and "database" in low:
        return ConnectionFailed(f"{msg}; check the database name")
    if "no pg_hba.conf entry for replication" in low:
        return ConnectionFailed(
            f"{msg}; allow replication connections for this user in pg_hba.conf "
            "(a line with database 'replication')"
        )
    if "ssl" in low and "server does not support" in low:
        return ConnectionFailed(
            f"{msg}; turn on ssl in the server's settings, or ask for less with sslmode "
            "in the connection string (sslmode=prefer uses TLS where the server offers it)"
        )
    if "no pg_hba.conf entry" in low or "pg_hba.conf rejects connection" in low:
        return ConnectionFailed(f"{msg}; allow this host, user and database in pg_hba.conf")
    if "number of requested standby connections exceeds" in low:
        return ConnectionFailed(f"{msg}; raise max_wal_senders and restart Postgres")
    return ConnectionFailed(
        f"could not connect to the server ({msg}); check the host, port and that it is running"
    )


def _no_server_named(dsn: str) -> bool:
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return False
    named = ("host", "hostaddr", "service")
    return not any(params.get(k) for k in named) and not (
        os.environ.get("PGHOST") or os.environ.get("PGHOSTADDR") or os.environ.get("PGSERVICE")
    )

"""walex's exceptions: one tree, one root.

Every error walex raises is a :class:`WalexError`. Errors in settings are
found before anything connects; they are also :class:`ValueError`.
Errors from psycopg and libpq are translated where they cross into walex,
with the original kept as ``__cause__``.

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
    │   └── DecodeError                        a pgoutput message walex cannot read
    └── HandlerError                           user code failed (the app's policies)
"""

from __future__ import annotations

from .lsn import LSN

__all__ = [
    "AuthenticationFailed",
    "ConfigurationError",
    "ConnectionFailed",
    "DecodeError",
    "HandlerError",
    "NoFreeReplicationSlots",
    "PublicationNotFound",
    "ReplicationNotPermitted",
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


class HandlerError(WalexError):
    """A handler (or destination) failed and the error policy gave up."""

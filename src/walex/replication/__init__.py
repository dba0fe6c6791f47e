"""Replication: the connection, the walsender's framing, its commands and the slot.

The lowest step of the flow: libpq in ``replication=database`` mode
(:mod:`~walex.replication.connection`), what its frames hold
(:mod:`~walex.replication.framing`), the commands as text
(:mod:`~walex.replication.commands`) and the slot
(:mod:`~walex.replication.slot`). Nothing here decodes pgoutput or knows
about transactions.
"""

from ..errors import ServerError
from .connection import ReplicationConnection, replication_conninfo
from .framing import now_pg_us, parse_keepalive

__all__ = [
    "ReplicationConnection",
    "ServerError",
    "now_pg_us",
    "parse_keepalive",
    "replication_conninfo",
]

"""Replication commands as text: every name and option value quoted by libpq.

``CREATE_REPLICATION_SLOT`` and ``START_REPLICATION`` are walsender commands,
not SQL, so psycopg's ``sql`` module does not compose them; the names and
values in them are escaped by libpq (:meth:`ReplicationConnection.quote_ident`
and :meth:`~ReplicationConnection.quote_literal`). Pure functions: they build
the text, :mod:`walex.replication.slot` and the stream run it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..lsn import LSN
from .connection import ReplicationConnection

__all__ = ["create_slot", "protocol_version", "start_replication"]


def protocol_version(server_version: int) -> int:
    """The highest pgoutput protocol version a server speaks (1 to 4)."""
    if server_version >= 160000:
        return 4
    if server_version >= 150000:
        return 3
    if server_version >= 140000:
        return 2
    return 1


def create_slot(
    conn: ReplicationConnection,
    slot: str,
    *,
    temporary: bool,
    two_phase: bool,
    server_version: int,
) -> str:
    """``CREATE_REPLICATION_SLOT`` for a pgoutput slot that exports no snapshot."""
    kind = " TEMPORARY" if temporary else ""
    head = f"CREATE_REPLICATION_SLOT {conn.quote_ident(slot)}{kind} LOGICAL pgoutput"
    if server_version >= 150000:
        options = "SNAPSHOT 'nothing'" + (", TWO_PHASE true" if two_phase else "")
        return f"{head} ({options})"
    return f"{head} NOEXPORT_SNAPSHOT"


def start_replication(
    conn: ReplicationConnection,
    slot: str,
    start: LSN,
    *,
    proto_version: int,
    publications: Sequence[str],
    messages: bool,
    binary: bool,
    streaming: bool,
    two_phase: bool,
    origin: str | None,
) -> str:
    """``START_REPLICATION`` of *slot* from *start* with pgoutput's options."""
    pubs = ",".join(conn.quote_ident(p) for p in publications)
    options = [("proto_version", str(proto_version)), ("publication_names", pubs)]
    if messages:
        options.append(("messages", "true"))
    if binary:
        options.append(("binary", "true"))
    if streaming:
        options.append(("streaming", "on"))
    if two_phase:
        options.append(("two_phase", "on"))
    if origin is not None:
        options.append(("origin", origin))
    opts = ", ".join(f"{key} {conn.quote_literal(value)}" for key, value in options)
    return f"START_REPLICATION SLOT {conn.quote_ident(slot)} LOGICAL {start} ({opts})"

"""Administration over a normal (SQL) connection: connect, preflight, slots, setup, doctor.

What walex checks and prepares on the server around streaming, and what the
``walex doctor``, ``walex setup`` and ``walex slots`` commands do, as
functions that programs can call too. It sits low in the flow: it imports
only :mod:`walex.errors`, :mod:`walex.events`, :mod:`walex.lsn` and
:mod:`walex.names`, never the stream, the replication connection, the app or
the commands.

- :mod:`.connect`: the SQL connection, its failures made walex's;
- :mod:`.preflight`: is the server ready to stream (before replication);
- :mod:`.slots`: list, look up and drop replication slots;
- :mod:`.setup`: table lookup and the statements that set up what is missing;
- :mod:`.doctor`: every check, with its fix.
"""

from __future__ import annotations

from ..errors import mask_dsn
from .connect import KEEPALIVES, connect_sql, connection_error
from .doctor import DEFAULT_LAG_WARN_BYTES, Check, CheckStatus, diagnose, format_bytes, worst
from .preflight import ServerFacts, check_server, preflight
from .setup import TableRef, find_tables, publication_tables, setup_plan, setup_problems
from .slots import SLOT_NAME, SlotStatus, drop_slot, list_slots, slot_info

__all__ = [
    "DEFAULT_LAG_WARN_BYTES",
    "KEEPALIVES",
    "SLOT_NAME",
    "Check",
    "CheckStatus",
    "ServerFacts",
    "SlotStatus",
    "TableRef",
    "check_server",
    "connect_sql",
    "connection_error",
    "diagnose",
    "drop_slot",
    "find_tables",
    "format_bytes",
    "list_slots",
    "mask_dsn",
    "preflight",
    "publication_tables",
    "setup_plan",
    "setup_problems",
    "slot_info",
    "worst",
]

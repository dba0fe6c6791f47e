"""The walsender's framing: what the frames of a replication copy stream hold.

* XLogData ``'w'``: start LSN, WAL end, server clock, then one pgoutput message
  (from byte :data:`XLOG_PAYLOAD` on);
* primary keepalive ``'k'``: WAL end, server clock, reply requested;
* standby status update ``'r'`` (sent by walex): write, flush and apply LSNs.

Pure functions over bytes: no I/O, nothing of pgoutput.
"""

from __future__ import annotations

import struct
import time

__all__ = [
    "KEEPALIVE",
    "PG_EPOCH_OFFSET_US",
    "XLOG_DATA",
    "XLOG_HEADER",
    "XLOG_PAYLOAD",
    "now_pg_us",
    "parse_keepalive",
    "status_update",
]

#: Microseconds between the Unix epoch and Postgres' epoch (2000-01-01 UTC).
PG_EPOCH_OFFSET_US = 946_684_800_000_000

#: The first byte of an XLogData frame and of a primary keepalive.
XLOG_DATA, KEEPALIVE = ord("w"), ord("k")
#: XLogData's header after its type byte: start LSN, WAL end, server clock.
XLOG_HEADER = struct.Struct(">QQq")
#: Where the pgoutput message of an XLogData frame starts.
XLOG_PAYLOAD = 1 + XLOG_HEADER.size

_KEEPALIVE = struct.Struct(">Qq?")
_STATUS = struct.Struct(">cQQQqB")


def now_pg_us() -> int:
    """The current time as microseconds since 2000-01-01 (Postgres' clock)."""
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US


def parse_keepalive(frame: bytes) -> tuple[int, int, bool]:
    """A primary keepalive frame: WAL end, server clock, reply requested."""
    wal_end, clock, reply = _KEEPALIVE.unpack_from(frame, 1)
    return wal_end, clock, reply


def status_update(write: int, flush: int, apply: int, reply: bool = False) -> bytes:
    """A standby status update: the positions written, flushed and applied."""
    return _STATUS.pack(b"r", write, flush, apply, now_pg_us(), 1 if reply else 0)

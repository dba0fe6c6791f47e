"""The C accelerator, or pure Python: chosen once, here, for the whole package.

``_speedups`` (``_speedups.c``) does in C what the hot path does most: the
tuple data of a pgoutput message (:mod:`walex.pgoutput`), a run of row
changes from frame to :class:`~walex.Event` (:mod:`walex.transactions`),
JSON values (:mod:`walex.values`), and an event to its wire bytes
(:mod:`walex.wire`). Each of those modules asks this one
for :data:`speedups` and uses its pure-Python code when it is ``None``; the
answers are the same either way (the tests run both).

:data:`__impl__` says which was chosen: ``"c"`` or ``"python"``. The
environment variable ``WALEX_IMPL`` decides it: ``python`` forces pure
Python, ``c`` insists on the extension (an ImportError when it is not
built), unset or empty takes C where it is built.

This module must not import any module above the values it hands to the
extension (events, LSN, errors, pgoutput's message types, the JSON parsers).
"""

from __future__ import annotations

import json
import os
from types import ModuleType
from typing import Literal

__all__ = ["ENV_VAR", "__impl__", "orjson", "speedups"]

#: The environment variable that picks the implementation.
ENV_VAR = "WALEX_IMPL"

try:
    import orjson
except ImportError:  # pragma: no cover - orjson comes with every install that has a C compiler
    orjson = None  # type: ignore[assignment]


def _load() -> ModuleType | None:
    wanted = os.environ.get(ENV_VAR, "").strip().lower()
    if wanted not in ("", "c", "python"):
        raise ImportError(f"{ENV_VAR}={wanted!r}: use 'c', 'python' or leave it unset")
    if wanted == "python":
        return None
    try:
        from . import _speedups
    except ImportError as exc:
        if wanted == "c":
            raise ImportError(
                f"{ENV_VAR}=c, but walex's C extension is not built ({exc}); reinstall walex "
                "where a C compiler is available, or unset the variable"
            ) from exc
        return None
    return _speedups


def _setup(ext: ModuleType) -> None:
    # The types the extension makes and raises. Imported here, after
    # `speedups` is bound, because pgoutput's decoder asks this module for
    # `speedups` while the pgoutput package (which owns some of them) loads.
    # The value types after them are those the wire encoder writes itself
    # (walex.wire's table; datetime's types it knows through the datetime
    # module's C API). What it does not know goes to wire.encode_value, which
    # wire hands it with each call: this module is below wire.
    from datetime import UTC, datetime
    from decimal import Decimal
    from enum import Enum
    from ipaddress import (
        IPv4Address,
        IPv4Interface,
        IPv4Network,
        IPv6Address,
        IPv6Interface,
        IPv6Network,
    )
    from uuid import UUID

    from psycopg.types.multirange import Multirange
    from psycopg.types.range import Range

    from ..errors import DecodeError
    from ..events import Batch, Event, Source, Transaction
    from ..lsn import LSN
    from ..pgoutput.messages import UNCHANGED_TOAST, TupleData

    ext.setup(UNCHANGED_TOAST, TupleData, DecodeError)
    ext.setup_events(Event, LSN, frozenset())
    ext.setup_transactions(Transaction, Batch, datetime(2000, 1, 1, tzinfo=UTC))
    ips = (IPv4Address, IPv6Address, IPv4Interface, IPv6Interface, IPv4Network, IPv6Network)
    ext.setup_wire(Source, Transaction, Decimal, UUID, Range, Multirange, Enum, ips)
    if orjson is not None:
        ext.setup_json(orjson.loads, orjson.JSONDecodeError, json.loads)
    else:  # pragma: no cover
        ext.setup_json(None, None, json.loads)


#: The C extension (set up before any of it runs); ``None`` when pure Python runs.
speedups: ModuleType | None = _load()

#: ``"c"`` or ``"python"``: which implementation runs.
__impl__: Literal["c", "python"] = "c" if speedups is not None else "python"

if speedups is not None:
    _setup(speedups)

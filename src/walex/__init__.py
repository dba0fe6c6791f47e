"""walex: Postgres change data capture for Python.

This module only gathers the public API; it holds no logic of its own.

Every insert, update, delete, truncate and logical message on the tables of a
publication, as Python values, in commit order, delivered at least once.

Example::

    import walex

    async with walex.connect("postgresql://localhost/app", publication="events",
                             slot="app", durable=True) as stream:
        async for batch in stream:
            for event in batch.events:
                print(event.type, event.table, event.new_record)
"""

from . import errors
from ._version import __version__
from .app import WalEx, run
from .errors import WalexError
from .events import Batch, Event, Source, Transaction
from .lsn import LSN
from .stream import Stream, connect

__all__ = [
    "LSN",
    "Batch",
    "Event",
    "Source",
    "Stream",
    "Transaction",
    "WalEx",
    "WalexError",
    "__version__",
    "connect",
    "errors",
    "run",
]

"""A throw-away local Postgres for the demo, the tests and the benchmarks.

:class:`EmbeddedPostgres` runs ``initdb`` and ``pg_ctl`` on a free port of
127.0.0.1 with a private socket directory and ``wal_level=logical``, from the
Postgres binaries that :func:`find_binaries` finds: the system's, or those
that the ``pgserver`` wheel ships (``pip install "walex[embedded]"``).

Postgres refuses to run as root. When the current user is root, the server
and its tools run as the ``postgres`` system user, or ``nobody`` when there
is none; the files they need are created for that user.

No server outlives the process that started it: :meth:`EmbeddedPostgres.cleanup`
(or leaving the ``with`` block) removes it; at exit, a finalizer stops what
was left running; and a process killed by a signal, which runs no
finalizer, leaves a small watchdog process behind that does the same.

The package has one module per concern: :mod:`.binaries` finds the
installations, :mod:`.process` watches the server's processes and stops a
cluster that its owner left behind, :mod:`.cluster` runs one cluster. It
imports no walex module but :mod:`walex.errors`.

Example:
    >>> with EmbeddedPostgres() as pg:  # doctest: +SKIP
    ...     dsn = pg.create_database("shop")
    ...     # stream from dsn ...
"""

from ..errors import EmbeddedPostgresError, PostgresNotFound
from .binaries import PostgresBinaries, find_binaries
from .cluster import DEFAULT_SETTINGS, EmbeddedPostgres, database_or_embedded

__all__ = [
    "DEFAULT_SETTINGS",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PostgresBinaries",
    "PostgresNotFound",
    "database_or_embedded",
    "find_binaries",
]

"""Postgres fixtures: a real cluster per major version, a fresh database per test.

``pg_server`` is parametrized over the major versions under test, so every
test that uses it (or ``db``) runs once per version, with the ids ``pg15``,
``pg16``... By default both 15 and 16 are tested; the environment variable
``WALEX_TEST_PG`` (``"16"``, ``"15,16"``) picks others. A version that is
asked for but not installed fails the tests that need it: a skip would let
a machine without it pass without testing anything.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg
import pytest
from psycopg import sql

from walex.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_binaries

__all__ = ["Database", "clusters", "db", "pg_server", "replica_pg", "requested_majors"]

_DEFAULT_MAJORS = (15, 16)

# What psycopg's execute() accepts.
Query = str | bytes | sql.SQL | sql.Composed
Params = Sequence[Any] | Mapping[str, Any] | None


def requested_majors() -> list[int]:
    """The Postgres major versions under test, from ``WALEX_TEST_PG``."""
    raw = os.environ.get("WALEX_TEST_PG", "").strip()
    if not raw:
        return list(_DEFAULT_MAJORS)
    try:
        majors = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        raise pytest.UsageError(
            f"WALEX_TEST_PG must be major versions separated by commas, got {raw!r}"
        ) from None
    if not majors:
        raise pytest.UsageError(f"WALEX_TEST_PG names no version: {raw!r}")
    return majors


# One cluster per major version for the whole session, started on first use.
# pytest would tear a parametrized session fixture down and up again when the
# order of tests switches versions; the cache makes that cost nothing.
_servers: dict[int, EmbeddedPostgres] = {}
# A version that failed to start fails every later test at once, not slowly.
_failures: dict[int, str] = {}
_counter = itertools.count(1)


def _server(major: int) -> EmbeddedPostgres:
    if major in _failures:
        pytest.fail(_failures[major], pytrace=False)
    server = _servers.get(major)
    if server is not None:
        return server
    installed = {found.major: found for found in find_binaries()}
    try:
        if major not in installed:
            have = ", ".join(f"{b.version} ({b.bindir})" for b in installed.values()) or "none"
            raise EmbeddedPostgresError(
                f"Postgres {major} is not installed (found: {have}). Install it, "
                'or `pip install "walex[embedded]"` for 16, or set WALEX_TEST_PG '
                "to the versions to test, e.g. WALEX_TEST_PG=16"
            )
        server = EmbeddedPostgres(installed[major])
        server.start()
    except EmbeddedPostgresError as exc:
        _failures[major] = f"cannot test with Postgres {major}: {exc}"
        pytest.fail(_failures[major], pytrace=False)
    _servers[major] = server
    return server


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop every cluster and remove its files."""
    while _servers:
        _, server = _servers.popitem()
        server.cleanup()


@pytest.fixture(scope="session", params=requested_majors(), ids=lambda major: f"pg{major}")
def pg_server(request: pytest.FixtureRequest) -> EmbeddedPostgres:
    """A running cluster of one major version, shared by the whole session."""
    major: int = request.param
    return _server(major)


def unique_name(prefix: str) -> str:
    """A lowercase identifier unique in this session: ``prefix_<n>``.

    Replication slots are per cluster, not per database, so their names
    must not repeat across tests.
    """
    cleaned = re.sub(r"[^a-z0-9_]+", "_", prefix.lower()).strip("_") or "x"
    number = f"_{next(_counter)}"
    return cleaned[: 63 - len(number)] + number


class Database:
    """A fresh database for one test, on the session's cluster.

    Attributes:
        server: the cluster.
        name: the database's name.
        dsn: a libpq connection string for it.
        major: the server's major version.
    """

    def __init__(self, server: EmbeddedPostgres, name: str) -> None:
        self.server = server
        self.name = name
        self.major = server.major
        self.dsn = server.create_database(name)

    def __repr__(self) -> str:
        return f"<Database {self.name} on Postgres {self.server.binaries.version}>"

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new autocommit connection to the database; the caller closes it."""
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn, **kwargs)

    def execute(self, query: Query, params: Params = None) -> None:
        """Run one statement in its own connection, autocommit."""
        with self.connect() as conn:
            conn.execute(query, params)

    def fetch(self, query: Query, params: Params = None) -> list[tuple[Any, ...]]:
        """Run one query in its own connection and return every row."""
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()

    def unique(self, prefix: str) -> str:
        """A lowercase identifier unique in this session (for slots, publications)."""
        return unique_name(prefix)

    def drop(self) -> None:
        """Drop the database, with its connections, slots and prepared transactions."""
        # The test may have stopped or killed the shared server: bring it back
        # (start() does nothing if it runs) for this and the next tests.
        self.server.start()
        self.server.drop_database(self.name)


@pytest.fixture
def db(pg_server: EmbeddedPostgres, request: pytest.FixtureRequest) -> Iterator[Database]:
    """A new, empty database on ``pg_server`` for this test, dropped after it."""
    # An earlier test may have left the shared server stopped or stopping.
    pg_server.start()
    database = Database(pg_server, unique_name(f"t_{request.node.name}"[:40]))
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture(scope="session")
def clusters() -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Make (once per binaries and settings) a small cluster of its own, for a test
    that needs settings the shared clusters must not change; remove them all after."""
    made: dict[tuple[str, tuple[tuple[str, str], ...]], EmbeddedPostgres] = {}

    def get(
        server: EmbeddedPostgres,
        settings: dict[str, str],
        setup: Callable[[EmbeddedPostgres], None] | None = None,
    ) -> EmbeddedPostgres:
        key = (str(server.binaries.bindir), tuple(sorted(settings.items())))
        if key not in made:
            cluster = EmbeddedPostgres(
                server.binaries, settings={"max_connections": "30", **settings}
            )
            made[key] = cluster
            cluster.start()
            if setup is not None:
                setup(cluster)
        return made[key]

    try:
        yield get
    finally:
        for cluster in made.values():
            cluster.cleanup()


@pytest.fixture
def replica_pg(pg_server: EmbeddedPostgres, clusters: Callable[..., EmbeddedPostgres]) -> Any:
    """A cluster of the version under test with ``wal_level=replica``."""
    return clusters(pg_server, {"wal_level": "replica"})

"""Set-up: the publication, replica identity and slot that streaming needs.

``walex setup`` and programs ask :func:`setup_plan` for the statements that
would create what is missing; this module composes them (every name quoted)
and looks tables up, but runs no statement that changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

from ..errors import ConfigurationError
from ..events import REPLICA_IDENTITY
from ..names import parse_table_name
from .slots import SLOT_NAME, slot_info

__all__ = [
    "TableRef",
    "find_tables",
    "publication_tables",
    "setup_plan",
    "setup_problems",
]


@dataclass(frozen=True, slots=True)
class TableRef:
    """A table that exists, as the catalog names it."""

    schema: str
    name: str
    oid: int
    replica_identity: str  # "default", "full", "index" or "nothing"
    has_primary_key: bool

    @property
    def qualified(self) -> str:
        """``schema.table``, unquoted, for messages."""
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        """The quoted ``"schema"."table"``."""
        return sql.Identifier(self.schema, self.name)


async def find_tables(conn: psycopg.AsyncConnection[Any], names: Sequence[str]) -> list[TableRef]:
    """Look tables up by name, each read as :func:`walex.names.parse_table_name` reads it.

    ``table`` is found through the search path, ``schema.table`` in its
    schema; double quotes keep dots, capitals and spaces (``'"my.schema"."T"'``).
    A pattern (``order_*``) is refused: a publication lists tables.

    Raises:
        ConfigurationError: a table does not exist, or a name is malformed,
            empty or a pattern.
    """
    found: list[TableRef] = []
    for raw in names:
        try:
            schema, table = parse_table_name(raw)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        if not table:
            raise ConfigurationError(f"{raw!r} is not a table name")
        ident = sql.Identifier(table) if schema is None else sql.Identifier(schema, table)
        # to_regclass resolves a bare name through search_path, as SQL would.
        cur = await conn.execute(
            """
            SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relreplident::text,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass(%s) AND c.relkind IN ('r', 'p')
            """,
            (ident.as_string(conn),),
        )
        row = await cur.fetchone()
        if row is None:
            raise ConfigurationError(
                f"table {raw!r} does not exist (or is not a table) in database "
                f"{conn.info.dbname!r}; create it first, or check the name and schema"
            )
        found.append(
            TableRef(
                schema=row[1],
                name=row[2],
                oid=int(row[0]),
                replica_identity=REPLICA_IDENTITY.get(row[3], row[3]),
                has_primary_key=bool(row[4]),
            )
        )
    return found


async def publication_tables(
    conn: psycopg.AsyncConnection[Any], publication: str
) -> tuple[bool, set[tuple[str, str]]] | None:
    """Whether *publication* is ``FOR ALL TABLES``, and its tables; ``None`` if missing."""
    cur = await conn.execute(
        "SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)
    )
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s",
        (publication,),
    )
    return bool(row[0]), {(r[0], r[1]) for r in await cur.fetchall()}


async def setup_plan(
    conn: psycopg.AsyncConnection[Any],
    *,
    publication: str,
    tables: Sequence[str],
    replica_identity: Literal["full", "default"] | None = None,
    slot: str | None = None,
) -> list[sql.Composed]:
    """The statements that would set up what is missing, in the order to run them.

    Nothing is changed. An empty list means everything is in place. The
    publication comes before the slot: a slot can only decode a publication
    that existed when the slot's WAL position was written.

    Raises:
        ConfigurationError: a table does not exist, or the slot name is invalid.
    """
    if slot is not None and not SLOT_NAME.match(slot):
        raise ConfigurationError(
            f"slot name {slot!r} is not valid: use 1 to 63 lower-case letters, "
            "digits and underscores"
        )
    refs = await find_tables(conn, tables)
    plan: list[sql.Composed] = []
    existing = await publication_tables(conn, publication)
    pub = sql.Identifier(publication)
    if existing is None:
        if refs:
            plan.append(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    pub, sql.SQL(", ").join(r.identifier for r in refs)
                )
            )
        else:
            plan.append(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(pub))
    else:
        all_tables, members = existing
        missing = [r for r in refs if (r.schema, r.name) not in members]
        if missing and not all_tables:
            plan.append(
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                    pub, sql.SQL(", ").join(r.identifier for r in missing)
                )
            )
    if replica_identity is not None:
        for ref in refs:
            if ref.replica_identity != replica_identity:
                plan.append(
                    sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
                        ref.identifier, sql.SQL(replica_identity.upper())
                    )
                )
    if slot is not None and await slot_info(conn, slot) is None:
        plan.append(
            sql.SQL("SELECT pg_create_logical_replication_slot({}, 'pgoutput')").format(
                sql.Literal(slot)
            )
        )
    return plan


async def setup_problems(
    conn: psycopg.AsyncConnection[Any],
    *,
    publication: str,
    tables: Sequence[str],
    replica_identity: Literal["full", "default"] | None = None,
    slot: str | None = None,
) -> list[str]:
    """What would make :func:`setup_plan`'s statements fail, found before any runs.

    ``walex setup`` checks these first and changes nothing when there is one,
    so that a failure halfway (the slot, after the publication was made)
    cannot leave half a set-up behind.

    Returns:
        One sentence per problem, with what fixes it; empty when the plan can run.
    """
    refs = await find_tables(conn, tables)
    cur = await conn.execute(
        """
        SELECT current_setting('wal_level'), current_user,
               (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
               (SELECT rolreplication FROM pg_roles WHERE rolname = current_user),
               has_database_privilege(current_user, current_database(), 'CREATE'),
               current_setting('max_replication_slots')::int,
               (SELECT count(*) FROM pg_replication_slots)::int,
               (SELECT pg_has_role(current_user, pubowner, 'USAGE')
                  FROM pg_publication WHERE pubname = %s)
        """,
        (publication,),
    )
    row = await cur.fetchone()
    assert row is not None
    wal_level, user, superuser, replication, may_create, max_slots, used, owns_pub = row
    who = sql.Identifier(user).as_string(conn)
    problems: list[str] = []
    existing = await publication_tables(conn, publication)
    if existing is None and not refs and not superuser:
        problems.append("a publication FOR ALL TABLES needs a superuser; name the tables (--table)")
    elif existing is None and not (may_create or superuser):
        problems.append(
            f"the role {user!r} may not create a publication in this database; "
            f"GRANT CREATE ON DATABASE ... TO {who};"
        )
    if existing is not None and not existing[0] and not (owns_pub or superuser):
        members = existing[1]
        if any((r.schema, r.name) not in members for r in refs):
            problems.append(
                f"the role {user!r} does not own publication {publication!r}, so it cannot "
                "add tables to it; run walex setup as its owner"
            )
    needs_owner = [
        r
        for r in refs
        if existing is None
        or (replica_identity is not None and r.replica_identity != replica_identity)
        or (not existing[0] and (r.schema, r.name) not in existing[1])
    ]
    if needs_owner and not superuser:
        cur = await conn.execute(
            "SELECT c.oid::int8 FROM pg_class c WHERE c.oid = ANY(%s) "
            "AND NOT pg_has_role(current_user, c.relowner, 'USAGE')",
            ([r.oid for r in needs_owner],),
        )
        foreign = {r[0] for r in await cur.fetchall()}
        names = ", ".join(r.qualified for r in needs_owner if r.oid in foreign)
        if names:
            problems.append(
                f"the role {user!r} does not own {names}: publishing a table or changing "
                "its replica identity needs its owner (or a superuser)"
            )
    if slot is not None and await slot_info(conn, slot) is None:
        if wal_level != "logical":
            problems.append(
                f"wal_level is {wal_level!r}, and a logical slot needs 'logical': run "
                "ALTER SYSTEM SET wal_level = 'logical'; then restart Postgres"
            )
        if not (replication or superuser):
            problems.append(
                f"the role {user!r} may not create a replication slot; run "
                f"ALTER ROLE {who} WITH REPLICATION; (as a superuser)"
            )
        if used >= max_slots:
            problems.append(
                f"all {max_slots} replication slots are in use; drop unused ones "
                "(walex slots DSN) or raise max_replication_slots and restart Postgres"
            )
    return problems

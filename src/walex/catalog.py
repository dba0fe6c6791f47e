"""The catalog: what walex learns about tables and types over a normal SQL connection.

The replication stream describes a table (a Relation message) by column names,
type OIDs and key flags only. :class:`Catalog` adds what the events need: the
type names, the primary key, and loaders for the types psycopg does not know
(enums, domains, composites, ranges and multiranges over them, hstore, arrays
of these), looked up once and registered in walex's own adapters map; then it
makes the table's :class:`~walex.values.RelationCodec`.

It owns the stream's SQL connection (opened on first use, opened again once
when it was lost while idle), which the stream also uses for its checks and
heartbeats. It must not touch the replication connection.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import AdaptersMap
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.hstore import register_hstore
from psycopg.types.multirange import MultirangeInfo, register_multirange
from psycopg.types.range import RangeInfo, register_range
from psycopg.types.string import TextBinaryLoader, TextLoader

from .admin import connect_sql, connection_error
from .errors import ConnectionFailed, StreamError
from .pgoutput.messages import Relation
from .values import RelationCodec, has_binary_loader, make_adapters, make_source

__all__ = ["BinaryUnsupported", "Catalog", "TypeResolver"]

logger = logging.getLogger(__name__)

_TEXT = Format.TEXT
_BINARY = Format.BINARY


class BinaryUnsupported(Exception):
    """Binary mode met a type psycopg cannot read in binary: stream in text.

    Attributes:
        names: the types, for the message.
    """

    def __init__(self, names: str) -> None:
        super().__init__(names)
        self.names = names


class Catalog:
    """Table and type lookups for one stream, over its own SQL connection.

    Args:
        dsn: the libpq connection string.
        connect_timeout: seconds to wait for the connection.
        database: the database's name (set by the stream after its checks).
    """

    def __init__(self, dsn: str, connect_timeout: float) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.adapters = make_adapters()
        self.resolver = TypeResolver(self.adapters)
        self._type_names: dict[tuple[int, int], str] = {}
        # What describe() needs of each published table, fetched for all of
        # them at once: relation OID → (column names and type OIDs, primary key).
        self._tables: dict[int, tuple[tuple[tuple[str, int], ...], tuple[str, ...]]] = {}
        self._publications: list[str] = []
        self._described: set[int] = set()  # relation OIDs described on this connection
        self.database = ""
        #: Whether row values come in binary: a table with a type psycopg
        #: cannot read in binary turns it off (see :class:`BinaryUnsupported`).
        self.binary = False

    # -- the connection ------------------------------------------------------

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The SQL connection, opened now if it is not open.

        Raises:
            ConnectionFailed: the server cannot be reached.
        """
        if self._conn is None or self._conn.closed:
            self._conn = await connect_sql(self._dsn, self._connect_timeout)
        return self._conn

    async def drop_connection(self) -> None:
        """Close the connection (it most likely broke); the next use opens another."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _lookup_connection(self) -> psycopg.AsyncConnection[Any]:
        try:
            return await self.connection()
        except ConnectionFailed:
            raise
        except psycopg.OperationalError as exc:
            raise connection_error(exc, self._dsn) from exc

    # -- tables --------------------------------------------------------------

    async def prefetch(self, publications: Sequence[str]) -> None:
        """Look up every published table at once: what :meth:`describe` needs.

        One query for the tables' columns, type names and primary keys, one
        batch for the types psycopg does not know: so that a stream over
        thousands of tables does not make a round trip per table.
        """
        self._publications = list(publications)
        self._described.clear()
        await self._fetch_tables(await self._lookup_connection())

    async def _fetch_tables(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(
            """
            SELECT c.oid::int8,
                   array_agg(a.attname::text ORDER BY a.attnum),
                   array_agg(a.atttypid::int8 ORDER BY a.attnum),
                   array_agg(a.atttypmod ORDER BY a.attnum),
                   array_agg(format_type(a.atttypid, NULLIF(a.atttypmod, -1)) ORDER BY a.attnum),
                   coalesce((
                     SELECT array_agg(k.attname::text ORDER BY u.n)
                       FROM pg_index i
                       JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS u(attnum, n) ON true
                       JOIN pg_attribute k ON k.attrelid = i.indrelid AND k.attnum = u.attnum
                      WHERE i.indrelid = c.oid AND i.indisprimary
                   ), '{}')
              FROM (SELECT DISTINCT schemaname, tablename FROM pg_publication_tables
                     WHERE pubname = ANY(%s)) pt
              JOIN pg_namespace n ON n.nspname = pt.schemaname
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE NOT c.oid = ANY(%s)
             GROUP BY c.oid
            """,
            (self._publications, [*self._tables, *self._described]),
        )
        oids: set[int] = set()
        for relid, names, types, mods, type_names, pkey in await cur.fetchall():
            self._tables[relid] = (tuple(zip(names, types, strict=True)), tuple(pkey))
            for t, m, name in zip(types, mods, type_names, strict=True):
                self._type_names[(t, m)] = name
            oids.update(types)
        if self.resolver.unknown(list(oids)):
            await self.resolver.resolve(conn, list(oids))

    async def describe(self, msg: Relation) -> RelationCodec:
        """The codec of the table that *msg* describes, with its types loadable.

        Raises:
            BinaryUnsupported: binary mode is on and a column's type has no
                binary loader; binary is now off (reconnect in text).
            StreamError: the catalog could not be read.
        """
        oids = [c.type_oid for c in msg.columns]
        for attempt in (1, 2):
            conn = await self._lookup_connection()
            try:
                known = await self._known_key(conn, msg)
                if self.resolver.unknown(oids):
                    await self.resolver.resolve(conn, oids)
                names = await self._type_names_for(conn, msg)
                pkey = known if known is not None else await self._primary_key(conn, msg.oid)
                break
            except psycopg.OperationalError as exc:
                # The SQL connection went away while idle (a timeout, a
                # proxy, pg_terminate_backend): open a new one, once.
                await self.drop_connection()
                if attempt == 2:
                    raise StreamError(
                        f"could not read the catalog for {msg.namespace}.{msg.name}: {exc}"
                    ) from exc
            except psycopg.Error as exc:
                raise StreamError(
                    f"could not read the catalog for {msg.namespace}.{msg.name}: {exc}"
                ) from exc
        if self.binary:
            self.require_binary_loaders(oids)
        source = make_source(msg, self.database, names, pkey)
        return RelationCodec(msg, source, self.adapters)

    async def _known_key(
        self, conn: psycopg.AsyncConnection[Any], msg: Relation
    ) -> tuple[str, ...] | None:
        """The primary key fetched in bulk, when it still describes this table's shape.

        Only for the first description of a table on a connection: a later
        Relation message means its shape changed, and it is looked up anew.
        """
        if msg.oid in self._described:
            return None
        if msg.oid not in self._tables and self._publications:
            await self._fetch_tables(conn)  # a table new since: fetch every new one at once
        self._described.add(msg.oid)
        known = self._tables.pop(msg.oid, None)
        if known is None:
            return None
        columns, pkey = known
        if columns != tuple((c.name, c.type_oid) for c in msg.columns):
            return None
        return pkey

    async def check_binary(self, publications: Sequence[str]) -> None:
        """Turn binary off if a published column has a type psycopg cannot read in binary."""
        conn = await self.connection()
        cur = await conn.execute(
            """
            SELECT DISTINCT a.atttypid::int8
              FROM pg_publication_tables pt
              JOIN pg_namespace n ON n.nspname = pt.schemaname
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              JOIN pg_attribute a ON a.attrelid = c.oid
             WHERE pt.pubname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
            """,
            (list(publications),),
        )
        oids = [r[0] for r in await cur.fetchall()]
        await self.resolver.resolve(conn, oids)
        with contextlib.suppress(BinaryUnsupported):
            self.require_binary_loaders(oids)

    def require_binary_loaders(self, oids: Sequence[int]) -> None:
        """Turn binary off and raise when a type in *oids* has no binary loader."""
        missing = [o for o in oids if not has_binary_loader(self.adapters, o)]
        if missing:
            self.binary = False
            names = ", ".join(str(self.adapters.types.get(o) or o) for o in missing)
            logger.warning(
                "binary=True: the published tables have types psycopg cannot read in "
                "binary (%s); streaming in text instead, which gives the same values",
                names,
            )
            raise BinaryUnsupported(names)

    async def _type_names_for(
        self, conn: psycopg.AsyncConnection[Any], msg: Relation
    ) -> dict[int, str]:
        keys = [(c.type_oid, c.type_modifier) for c in msg.columns]
        todo = [k for k in keys if k not in self._type_names]
        if todo:
            cur = await conn.execute(
                "SELECT t, m, format_type(t, NULLIF(m, -1)) "
                "FROM unnest(%s::oid[], %s::int4[]) AS u(t, m)",
                ([k[0] for k in todo], [k[1] for k in todo]),
            )
            for t, m, name in await cur.fetchall():
                self._type_names[(int(t), m)] = name
        return {i: self._type_names.get(k, "unknown") for i, k in enumerate(keys)}

    async def _primary_key(self, conn: psycopg.AsyncConnection[Any], oid: int) -> tuple[str, ...]:
        cur = await conn.execute(
            """
            SELECT a.attname::text
              FROM pg_index i
              JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = %s AND i.indisprimary
             ORDER BY k.n
            """,
            (oid,),
        )
        return tuple(r[0] for r in await cur.fetchall())


class TypeResolver:
    """Registers loaders for types psycopg does not know, looked up once.

    Args:
        adapters: where to register the loaders.
    """

    def __init__(self, adapters: AdaptersMap) -> None:
        self.adapters = adapters
        self._seen: set[int] = set()

    def unknown(self, oids: Sequence[int]) -> list[int]:
        """The OIDs among *oids* that are neither known nor looked up yet."""
        types = self.adapters.types
        return [o for o in set(oids) if o not in self._seen and types.get(o) is None]

    async def resolve(self, conn: psycopg.AsyncConnection[Any], oids: Sequence[int]) -> None:
        """Look up *oids* in the catalog and register a loader for each."""
        todo = self.unknown(oids)
        while todo:
            rows = await (
                await conn.execute(
                    """
                    SELECT t.oid::int8, n.nspname, t.typname, t.typtype, t.typbasetype::int8,
                           t.typelem::int8, t.typarray::int8, t.typcategory,
                           e.extname
                      FROM pg_type t
                      JOIN pg_namespace n ON n.oid = t.typnamespace
                      LEFT JOIN pg_depend d ON d.classid = 'pg_type'::regclass
                           AND d.objid = t.oid AND d.deptype = 'e'
                      LEFT JOIN pg_extension e ON e.oid = d.refobjid
                     WHERE t.oid = ANY(%s)
                    """,
                    (todo,),
                )
            ).fetchall()
            self._seen.update(todo)
            found = {r[0] for r in rows}
            for oid in todo:
                if oid not in found:
                    logger.warning("type OID %s is not in the catalog; its values stay text", oid)
            follow: list[int] = []
            for oid, nsp, name, typtype, base, elem, array, category, ext in rows:
                if category == "A" and elem:
                    # An array of a type we do not know yet: load the element
                    # type; registering it registers its array too.
                    if self.adapters.types.get(elem) is None:
                        follow.append(elem)
                    continue
                try:
                    await self._register(conn, oid, nsp, name, typtype, base, array, ext)
                except (psycopg.Error, TypeError, ValueError) as exc:
                    logger.warning(
                        "cannot load type %s.%s (OID %s), its values stay text: %s",
                        nsp,
                        name,
                        oid,
                        exc,
                    )
            todo = self.unknown(follow)

    async def _register(
        self,
        conn: psycopg.AsyncConnection[Any],
        oid: int,
        nsp: str,
        name: str,
        typtype: str,
        base: int,
        array: int,
        ext: str | None,
    ) -> None:
        qualified = sql.Identifier(nsp, name)
        adapters = self.adapters
        if typtype == "e":
            # Enums load as their label, a str, in text and binary alike.
            TypeInfo(name, oid, array).register(adapters)
            adapters.register_loader(oid, TextLoader)
            adapters.register_loader(oid, TextBinaryLoader)
        elif typtype == "d":
            if adapters.types.get(base) is None:
                await self.resolve(conn, [base])
            TypeInfo(name, oid, array).register(adapters)
            for fmt in (_TEXT, _BINARY):
                loader = adapters.get_loader(base, fmt)
                if loader is not None:
                    adapters.register_loader(oid, loader)
        elif typtype == "c":
            info = await CompositeInfo.fetch(conn, qualified)
            if info is not None:
                await self.resolve(conn, info.field_types)
                register_composite(info, adapters)
        elif typtype == "r":
            rinfo = await RangeInfo.fetch(conn, qualified)
            if rinfo is not None:
                await self.resolve(conn, [rinfo.subtype_oid])
                register_range(rinfo, adapters)
        elif typtype == "m":
            minfo = await MultirangeInfo.fetch(conn, qualified)
            if minfo is not None:
                await self.resolve(conn, [minfo.subtype_oid])
                register_multirange(minfo, adapters)
        elif ext == "hstore" and name == "hstore":
            hinfo = await TypeInfo.fetch(conn, qualified)
            if hinfo is not None:
                register_hstore(hinfo, adapters)
        else:
            logger.info("type %s.%s (OID %s) has no loader; its values stay text", nsp, name, oid)

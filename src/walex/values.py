"""Column values: raw pgoutput bytes → Python objects, by psycopg's loaders.

Each table gets a :class:`RelationCodec` when the server describes it (a
Relation message). The codec holds two psycopg transformers, one for text and
one for binary values, set up for the table's column types, so that a whole
row is loaded by one call into psycopg's C code.

Types psycopg does not know are looked up by :mod:`walex.catalog` and
registered in walex's own adapters map. A type that nothing knows arrives as
its text (or, in binary mode, as its raw bytes). This module does no I/O: it
turns bytes into values and rows into records (TOAST included), nothing more.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.pq import Format
from psycopg.types import datetime as dt

from ._accel import orjson, speedups
from .events import REPLICA_IDENTITY, Source
from .pgoutput.messages import UNCHANGED_TOAST, Relation, TupleData

__all__ = [
    "RelationCodec",
    "has_binary_loader",
    "make_adapters",
    "make_tolerant_adapters",
]

logger = logging.getLogger(__name__)

_TEXT = Format.TEXT
_BINARY = Format.BINARY


_orjson = orjson

_long_number = re.compile(rb"[0-9]{19}").search


def json_loads(data: str | bytes) -> Any:
    """orjson where it gives the same answer as the standard library, else json.

    orjson turns integers beyond 64 bits into floats (silently losing digits)
    and refuses numbers beyond a double's range; the standard library keeps
    both exact, as a plain psycopg SELECT does.
    """
    if _orjson is not None and isinstance(data, bytes) and _long_number(data) is None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(data)


class _JsonLoader(Loader):
    """json and jsonb text values through :func:`json_loads`, in one call."""

    def load(self, data: Buffer) -> Any:
        return json_loads(data if type(data) is bytes else bytes(data))


if speedups is not None:
    _c_json_loads = speedups.json_loads
    _c_jsonb_loads = speedups.jsonb_loads

    class _FastJsonLoader(Loader):
        """The same answers as :class:`_JsonLoader`, from a JSON parser in C
        that leaves what it does not handle to orjson and json.loads. psycopg
        calls ``load`` with bytes, so no Python frame is needed on the way."""

        load = staticmethod(_c_json_loads)

    _JsonTextLoader: type[Loader] = _FastJsonLoader
else:  # pragma: no cover
    _JsonTextLoader = _JsonLoader


class _JsonbBinaryLoader(Loader):
    """jsonb in binary: a version byte (1), then the text."""

    format = _BINARY

    def load(self, data: Buffer) -> Any:
        if data[:1] != b"\x01":
            raise ValueError(f"unknown jsonb binary format: version {bytes(data[:1])!r}")
        return json_loads(bytes(data[1:]))


class _JsonBinaryLoader(_JsonTextLoader):  # type: ignore[valid-type,misc]
    """json in binary is its text."""

    format = _BINARY


_JsonbBinary: type[Loader] = _JsonbBinaryLoader
if speedups is not None:

    class _FastJsonbBinaryLoader(Loader):
        """:class:`_JsonbBinaryLoader` in C."""

        format = _BINARY
        load = staticmethod(_c_jsonb_loads)

    _JsonbBinary = _FastJsonbBinaryLoader


def make_adapters() -> AdaptersMap:
    """A private adapters map for walex, with a fast JSON loader if installed."""
    adapters = AdaptersMap(psycopg.adapters)
    adapters.register_loader("json", _JsonTextLoader)
    adapters.register_loader("jsonb", _JsonTextLoader)
    adapters.register_loader("json", _JsonBinaryLoader)
    adapters.register_loader("jsonb", _JsonbBinary)
    return adapters


def make_tolerant_adapters(adapters: AdaptersMap) -> AdaptersMap:
    """Loaders for values Python's types cannot hold, used only after a failure.

    ``infinity`` and ``-infinity`` dates and timestamps become those strings
    (element by element inside arrays); everything else is as in *adapters*.
    """
    tolerant = AdaptersMap(adapters)
    # psycopg's C loaders cannot be subclassed; its Python ones can, and
    # load the same values. This path is taken only for rows that failed.
    for name, text, binary in (
        ("date", dt.DateLoader, dt.DateBinaryLoader),
        ("timestamp", dt.TimestampLoader, dt.TimestampBinaryLoader),
        ("timestamptz", dt.TimestamptzLoader, dt.TimestamptzBinaryLoader),
    ):
        oid = adapters.types[name].oid
        tolerant.register_loader(oid, _infinity_text(text))
        tolerant.register_loader(oid, _infinity_binary(binary, name == "date"))
    return tolerant


def _infinity_text(base: type[Loader]) -> type[Loader]:
    class InfinityTextLoader(base):  # type: ignore[valid-type,misc]
        def load(self, data: Buffer) -> Any:
            raw = bytes(data)
            if raw in (b"infinity", b"-infinity"):
                return raw.decode()
            return super().load(data)

    return InfinityTextLoader


_INFINITIES = {
    True: {(1 << 31) - 1: "infinity", -(1 << 31): "-infinity"},
    False: {(1 << 63) - 1: "infinity", -(1 << 63): "-infinity"},
}


def _infinity_binary(base: type[Loader], is_date: bool) -> type[Loader]:
    table = _INFINITIES[is_date]

    class InfinityBinaryLoader(base):  # type: ignore[valid-type,misc]
        def load(self, data: Buffer) -> Any:
            special = table.get(int.from_bytes(data, "big", signed=True))
            return special if special is not None else super().load(data)

    return InfinityBinaryLoader


def has_binary_loader(adapters: AdaptersMap, oid: int) -> bool:
    """Whether psycopg can read values of type *oid* in binary format."""
    return adapters.get_loader(oid, _BINARY) is not None


class RelationCodec:
    """Turns the rows of one table into records.

    Args:
        rel: the Relation message.
        source: the table's description.
        adapters: the loaders to use.
    """

    __slots__ = (
        "_adapters",
        "_key_idx",
        "_load_binary",
        "_load_text",
        "_tolerant",
        "_tx_binary",
        "_tx_text",
        "names",
        "oids",
        "source",
    )

    def __init__(
        self,
        rel: Relation,
        source: Source,
        adapters: AdaptersMap,
    ) -> None:
        self.source = source
        self._adapters = adapters
        self._tolerant: AdaptersMap | None = None
        self.names = tuple(c.name for c in rel.columns)
        self.oids = [c.type_oid for c in rel.columns]
        self._key_idx = tuple(i for i, c in enumerate(rel.columns) if c.flags & 1)
        self._tx_text = Transformer(adapters)
        self._tx_text.set_loader_types(self.oids, _TEXT)
        self._tx_binary = Transformer(adapters)
        self._tx_binary.set_loader_types(self.oids, _BINARY)
        self._load_text = self._tx_text.load_sequence
        self._load_binary = self._tx_binary.load_sequence

    def fast_path(self) -> tuple[Any, ...]:
        """What the C fast path needs: names, the two loaders, the source, and
        the template each record dict is copied from."""
        return (
            self.names,
            self._load_text,
            self._load_binary,
            self.source,
            dict.fromkeys(self.names),
        )

    def load(self, tup: TupleData) -> tuple[dict[str, Any], frozenset[str]]:
        """The record of a row, and the names of its unchanged TOAST columns."""
        values = tup.values
        if tup.toast:
            return self._load_toasted(tup)
        if len(values) != len(self.names):
            return self._load_mismatched(tup), _NONE
        row: Sequence[Any]
        try:
            if not tup.binary:
                row = self._load_text(values)  # type: ignore[arg-type]
            elif not tup.text:
                row = self._load_binary(values)  # type: ignore[arg-type]
            else:
                row = self._load_mixed(values, tup.kinds)  # type: ignore[arg-type]
        except Exception:
            # A value Python cannot hold (an infinite date, a JSON number
            # beyond float) must not stop the stream: load value by value.
            row = self._load_tolerant(values, tup)  # type: ignore[arg-type]
        # Same length: checked above.
        return dict(zip(self.names, row)), _NONE  # noqa: B905

    def load_key(self, tup: TupleData) -> dict[str, Any]:
        """The record of an old row sent as key columns only (kind ``'K'``)."""
        rec, _ = self.load(tup)
        names = self.names
        return {names[i]: rec[names[i]] for i in self._key_idx if names[i] in rec}

    def _load_toasted(self, tup: TupleData) -> tuple[dict[str, Any], frozenset[str]]:
        names = self.names
        values = [None if v is UNCHANGED_TOAST else v for v in tup.values]
        missing = frozenset(names[i] for i, v in enumerate(tup.values) if v is UNCHANGED_TOAST)
        plain = TupleData(values, tup.binary, tup.text, 0, tup.kinds)
        rec, _ = self.load(plain)
        for name in missing:
            del rec[name]
        return rec, missing

    def _load_tolerant(self, values: list[bytes | None], tup: TupleData) -> list[Any]:
        out: list[Any] = []
        if self._tolerant is None:
            self._tolerant = make_tolerant_adapters(self._adapters)
        tx = Transformer(self._tolerant)
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            binary = tup.kinds[i] == 98 if tup.kinds else bool(tup.binary)
            fmt = _BINARY if binary else _TEXT
            try:
                out.append(tx.get_loader(self.oids[i], fmt).load(v))
            except Exception as exc:
                # Keep the value as the server sent it: text, or raw bytes
                # in binary mode. Never drop it, never stop the stream.
                logger.warning(
                    "%s.%s: column %r holds a value that cannot be loaded (%s); "
                    "it is delivered as %s",
                    self.source.schema,
                    self.source.table,
                    self.names[i],
                    exc,
                    "raw bytes" if binary else "text",
                )
                out.append(v if binary else v.decode(errors="replace"))
        return out

    def _load_mixed(self, values: list[bytes | None], kinds: bytes) -> list[Any]:
        out: list[Any] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
            elif kinds[i] == 98:  # 'b'
                out.append(self._tx_binary.get_loader(self.oids[i], _BINARY).load(v))
            else:
                out.append(self._tx_text.get_loader(self.oids[i], _TEXT).load(v))
        return out

    def _load_mismatched(self, tup: TupleData) -> dict[str, Any]:
        # The row has a different column count than the Relation message said:
        # a protocol surprise. Keep every value rather than drop any.
        names = list(self.names)
        names += [f"column_{i + 1}" for i in range(len(names), len(tup.values))]
        out: dict[str, Any] = {}
        for i, v in enumerate(tup.values):
            if v is None or v is UNCHANGED_TOAST:
                out[names[i]] = None
            elif i < len(self.oids):
                fmt = _BINARY if tup.binary and not tup.text else _TEXT
                tx = self._tx_binary if fmt == _BINARY else self._tx_text
                out[names[i]] = tx.get_loader(self.oids[i], fmt).load(v)  # type: ignore[arg-type]
            else:
                out[names[i]] = v
        return out


_NONE: frozenset[str] = frozenset()


def make_source(
    rel: Relation, database: str, types: dict[int, str], pkey: tuple[str, ...]
) -> Source:
    """A :class:`Source` for *rel*; *types* maps type OID and modifier to names."""
    return Source(
        database=database,
        schema=rel.namespace,
        table=rel.name,
        columns={c.name: types.get(i, "unknown") for i, c in enumerate(rel.columns)},
        primary_key=pkey,
        replica_identity=REPLICA_IDENTITY.get(rel.replica_identity, rel.replica_identity),
        identity_columns=tuple(c.name for c in rel.columns if c.flags & 1),
        relation_oid=rel.oid,
    )

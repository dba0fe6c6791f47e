"""One JSON shape for an event, the same everywhere walex writes events out.

It owns the encoding of events to JSON; it does no I/O and sends nothing
anywhere.

``walex tail --format json``, the file destination and every broker
destination write an event as :func:`to_dict` describes, encoded by
:func:`dumps` (text) or :func:`dumpb` (UTF-8 bytes, the same document). The
shape is stable (version 1), documented in ``docs/wire-format.md`` and
described by the JSON Schema :data:`JSON_SCHEMA`, also in
``docs/event.schema.json``.

Values are encoded without loss, as text where JSON has no type for them:

==================  ==================================================
Python value        JSON
==================  ==================================================
``Decimal``         string: ``"1234.50"``, ``"NaN"``
``float`` NaN, ±inf string: ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
``datetime`` etc.   ISO 8601 string: ``"2024-05-01T12:00:00+00:00"``
``timedelta``       ISO 8601 duration: ``"P1DT3600.5S"``
``UUID``, IPs       string
``bytes``           string ``"\\\\x"`` + hex, as Postgres prints bytea
``Range``           ``{"lower", "upper", "bounds": "[)", "empty"}``
``Multirange``      list of ranges
composite           object of its fields
anything else       ``str(value)``
==================  ==================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
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
from typing import Any
from uuid import UUID

from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

from ._accel import speedups
from .events import Event

__all__ = ["JSON_SCHEMA", "WIRE_VERSION", "dumpb", "dumps", "encode_value", "to_dict"]

WIRE_VERSION = 1

_IP = (IPv4Address, IPv6Address, IPv4Interface, IPv6Interface, IPv4Network, IPv6Network)


def encode_value(value: Any) -> Any:
    """A JSON-ready form of one column value (see the module's table)."""
    cls = type(value)
    if cls in _AS_IS:
        return value
    exact = _EXACT.get(cls)
    if exact is not None:
        return exact(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _duration(value)
    if isinstance(value, (UUID, *_IP)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, Range):
        return {
            "lower": encode_value(value.lower),
            "upper": encode_value(value.upper),
            "bounds": value.bounds,
            "empty": value.isempty,
        }
    if isinstance(value, Multirange):
        return [encode_value(r) for r in value]
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: encode_value(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if isinstance(value, Enum):
        return encode_value(value.value)
    return str(value)


def _duration(td: timedelta) -> str:
    seconds = td.seconds + td.microseconds / 1_000_000
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return f"P{td.days}DT{text}S"


def _float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


# The common types, found by their exact type before the isinstance chain
# (the answer the chain gives them: a subclass still takes the chain).
_AS_IS = frozenset({str, int, bool, type(None)})
_EXACT: dict[type, Callable[[Any], Any]] = {
    float: _float,
    Decimal: str,
    datetime: datetime.isoformat,
    date: date.isoformat,
    time: time.isoformat,
    timedelta: _duration,
    UUID: str,
    bytes: lambda value: "\\x" + value.hex(),
    dict: lambda value: {str(k): encode_value(v) for k, v in value.items()},
    list: lambda value: [encode_value(v) for v in value],
    tuple: lambda value: [encode_value(v) for v in value],
}


def _record(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {k: v if type(v) in _AS_IS else encode_value(v) for k, v in record.items()}


def to_dict(event: Event) -> dict[str, Any]:
    """The wire form of *event*: a dict of JSON-ready values."""
    changes = event.changes
    out: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "schema": event.schema,
        "table": event.table,
        "new_record": _record(event.new_record),
        "old_record": _record(event.old_record),
        "changes": (
            None
            if changes is None
            else {k: [encode_value(o), encode_value(n)] for k, (o, n) in changes.items()}
        ),
        "unchanged_toast": sorted(event.unchanged_toast),
        "commit_timestamp": event.commit_timestamp.isoformat(),
        "commit_lsn": str(event.commit_lsn),
        "lsn": str(event.lsn),
        "xid": event.xid,
        "seq": event.seq,
        "version": WIRE_VERSION,
    }
    if event.source is not None:
        out["primary_key"] = {
            k: encode_value((event.record or {}).get(k)) for k in event.source.primary_key
        }
    if event.type == "message":
        content = event.content or b""
        try:
            out["content"] = content.decode()
            out["content_encoding"] = "text"
        except UnicodeDecodeError:
            out["content"] = "\\x" + content.hex()
            out["content_encoding"] = "hex"
        out["prefix"] = event.prefix
        out["transactional"] = event.transactional
    if event.type == "truncate":
        out["truncated"] = list(event.truncated)
        out["cascade"] = event.cascade
        out["restart_identity"] = event.restart_identity
    return out


def dumps(event: Event) -> str:
    """One event as one line of JSON (no newline).

    The reference encoding: :func:`to_dict` written by the standard library's
    ``json`` (``ensure_ascii=False``, no spaces). :func:`dumpb` writes the same
    document as bytes.
    """
    return _json_encode(to_dict(event))


def dumpb(event: Event) -> bytes:
    """One event as one line of UTF-8 JSON (no newline): what destinations send.

    Byte for byte ``dumps(event).encode()``, written straight from the event
    by the C extension when it runs (:mod:`walex._accel`): about 1 µs for a
    typical row, some twenty times less than the pure-Python path
    (``bench/wire.py``). It writes every value of this module's table itself
    and asks :func:`encode_value` for anything else; where it is unsure of the
    event as a whole (say a string with a lone surrogate, which UTF-8 cannot
    hold) it leaves the event to the pure-Python path, whose answer or
    exception stands. Integers of any size are exact either way.

    Raises:
        UnicodeEncodeError: a string holds a lone surrogate; and whatever else
            ``dumps(event).encode()`` raises, the same.
    """
    encode = _c_encode
    if encode is not None:
        data = encode(event, encode_value)
        if data is not None:
            return data
    return _json_encode(to_dict(event)).encode()


# What json.dumps(obj, ensure_ascii=False, separators=(",", ":")) makes anew on
# every call, made once.
_json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: The C encoder, ``None`` when pure Python runs (the tests switch it off too).
_c_encode: Callable[[Event, Callable[[Any], Any]], bytes | None] | None = (
    speedups.encode_event if speedups is not None else None
)


_LSN = {"type": "string", "pattern": "^[0-9A-F]{1,8}/[0-9A-F]{1,8}$"}
_RECORD = {
    "type": ["object", "null"],
    "description": "Column name to value, encoded as the module's table shows.",
    "additionalProperties": True,
}

#: The JSON Schema (draft 2020-12) of :func:`to_dict`'s output, also in
#: ``docs/event.schema.json`` (a test keeps the two the same).
JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/walex-py/walex/blob/main/docs/event.schema.json",
    "title": "walex event",
    "description": (
        "One change captured from Postgres by walex, as destinations and "
        "`walex tail --format json` write it. Version 1."
    ),
    "type": "object",
    "required": [
        "id",
        "type",
        "schema",
        "table",
        "new_record",
        "old_record",
        "changes",
        "unchanged_toast",
        "commit_timestamp",
        "commit_lsn",
        "lsn",
        "xid",
        "seq",
        "version",
    ],
    "properties": {
        "id": {
            "type": "string",
            "pattern": "^[0-9A-F]{1,8}/[0-9A-F]{1,8}:[0-9]+$",
            "description": (
                "The idempotency key: '<commit_lsn>:<seq>'. The same every time the "
                "change is delivered; deduplicate on it."
            ),
        },
        "type": {"enum": ["insert", "update", "delete", "truncate", "message"]},
        "schema": {"type": ["string", "null"], "description": "null for messages"},
        "table": {"type": ["string", "null"], "description": "null for messages"},
        "new_record": {**_RECORD, "description": "The new row (insert, update), else null."},
        "old_record": {
            **_RECORD,
            "description": (
                "The old row as Postgres sent it (update, delete): the whole row under "
                "REPLICA IDENTITY FULL, else the key columns or null."
            ),
        },
        "changes": {
            "type": ["object", "null"],
            "description": (
                "Update under REPLICA IDENTITY FULL: column to [old, new] for each column "
                "that differs. null when the old row is not known, and for other types."
            ),
            "additionalProperties": {"type": "array", "minItems": 2, "maxItems": 2},
        },
        "unchanged_toast": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Columns whose large value did not change and was not sent.",
        },
        "commit_timestamp": {
            "type": "string",
            "format": "date-time",
            "description": "The commit time, ISO 8601 with its UTC offset.",
        },
        "commit_lsn": {**_LSN, "description": "The LSN of the transaction's commit."},
        "lsn": {**_LSN, "description": "The LSN of the change itself."},
        "xid": {"type": "integer", "minimum": 0, "description": "The transaction id."},
        "seq": {
            "type": "integer",
            "minimum": 0,
            "description": "The change's index in its transaction, from 0.",
        },
        "version": {"const": WIRE_VERSION, "description": "The version of this shape."},
        "primary_key": {
            "type": "object",
            "description": (
                "Tables only: primary-key column to value, taken from the new row (the "
                "old one for a delete). Empty when the table has no primary key."
            ),
        },
        "prefix": {"type": ["string", "null"], "description": "Messages: the prefix."},
        "content": {
            "type": "string",
            "description": "Messages: the content, as text or as '\\\\x' + hex.",
        },
        "content_encoding": {"enum": ["text", "hex"]},
        "transactional": {"type": ["boolean", "null"]},
        "truncated": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Truncates: every table the statement truncated, 'schema.table'.",
        },
        "cascade": {"type": "boolean"},
        "restart_identity": {"type": "boolean"},
    },
    "additionalProperties": False,
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "message"}}},
            "then": {"required": ["prefix", "content", "content_encoding", "transactional"]},
            "else": {"required": ["primary_key"]},
        },
        {
            "if": {"properties": {"type": {"const": "truncate"}}},
            "then": {"required": ["truncated", "cascade", "restart_identity"]},
        },
    ],
}

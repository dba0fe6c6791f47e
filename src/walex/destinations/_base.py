"""The destination protocol (from :mod:`walex.routing`), its error, name templates,
optional imports.

It must not talk to any broker.
"""

from __future__ import annotations

import importlib
import string
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError, DestinationError
from ..events import Event
from ..routing import Destination
from ..wire import encode_value

__all__ = ["EXTRAS", "Destination", "DestinationError", "Template", "require"]


# -- optional client libraries --------------------------------------------

#: destination name → (module to import, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "webhook": ("httpx", "webhook"),
    "redis": ("redis.asyncio", "redis"),
    "nats": ("nats", "nats"),
    "rabbitmq": ("aio_pika", "rabbitmq"),
    "mqtt": ("aiomqtt", "mqtt"),
}


def require(destination: str) -> None:
    """Check that the client library of *destination* can be imported.

    Destinations call this when they are made, so that a missing library is
    reported at configuration time, before anything connects.

    Raises:
        ConfigurationError: with the ``pip install`` line that fixes it.
    """
    module, extra = EXTRAS[destination]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"the {destination} destination needs {module.split('.')[0]}: "
            f'pip install "walex[{extra}]"'
        ) from exc


# -- routing templates ----------------------------------------------------

_FIELDS = frozenset({"schema", "table", "type", "pk", "database"})


def _pk_values(event: Event) -> list[Any] | None:
    source = event.source
    if source is None:
        return None
    columns = source.primary_key or (
        source.identity_columns if source.replica_identity in ("index", "full") else ()
    )
    if source.replica_identity == "full" and not source.primary_key:
        return None  # the whole row is no key: one partition for the table
    record = event.record
    if not columns or record is None:
        return None
    return [record.get(c) for c in columns]


class Template:
    """A subject, stream, routing key or topic made from each event.

    Fields: ``{schema}``, ``{table}``, ``{type}``, ``{database}`` and
    ``{pk}``: the primary-key values joined with *pk_separator* (the replica
    identity index's columns where there is no primary key). The key comes
    from the new row, from the old row for a delete; a truncate, a message
    or a table without a key gives ``"_"``, as do the table names of a
    message. Put ``{pk}`` into the name to partition by row: every change
    of one row lands in the same partition, in commit order.

    Args:
        pattern: for example ``"cdc.{schema}.{table}.{pk}"``.
        escape: applied to each value put in, to keep the destination's
            separators and wildcards out of it.
        pk_separator: joins the values of a key with several columns.

    Raises:
        ConfigurationError: the pattern names an unknown field.

    Example::

        >>> Template("cdc.{table}.{pk}").render(event)
        'cdc.orders.42'
    """

    __slots__ = ("_constant", "_escape", "_pk_sep", "pattern")

    def __init__(
        self,
        pattern: str,
        *,
        escape: Callable[[str], str] | None = None,
        pk_separator: str = "_",
    ) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigurationError("a name template must be a non-empty string")
        try:
            parsed = list(string.Formatter().parse(pattern))
        except ValueError as exc:
            raise ConfigurationError(f"template {pattern!r}: {exc}") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in _FIELDS or spec or conversion:
                raise ConfigurationError(
                    f"template {pattern!r}: unknown field {{{field}}}; use "
                    + ", ".join(f"{{{f}}}" for f in sorted(_FIELDS))
                )
        self.pattern = pattern
        self._escape = escape
        self._pk_sep = pk_separator
        self._constant = all(field is None for _, field, _, _ in parsed)

    def __repr__(self) -> str:
        return f"Template({self.pattern!r})"

    def render(self, event: Event) -> str:
        """The name for *event*."""
        if self._constant:
            return self.pattern
        esc = self._escape or _same
        values = _pk_values(event)
        pk = "_" if not values else self._pk_sep.join(esc(_text(v)) for v in values)
        source = event.source
        return self.pattern.format_map(
            {
                "schema": esc(source.schema) if source is not None else "_",
                "table": esc(source.table) if source is not None else "_",
                "database": esc(source.database) if source is not None else "_",
                "type": event.type,
                "pk": pk,
            }
        )


def _same(text: str) -> str:
    return text


def _text(value: Any) -> str:
    encoded = encode_value(value)
    return encoded if isinstance(encoded, str) else str(encoded)

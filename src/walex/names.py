"""Table names and table patterns: the one grammar every part of walex reads.

Subscriptions, handlers, destination routes, the filter helpers, ``walex
setup --table`` and ``walex tail --table`` all read a table the same way:

- ``todo``: the table ``todo`` (in ``public`` for a pattern; through the
  search path where an existing table is looked up);
- ``app.todo`` (or WalEx's ``app:todo``): the table ``todo`` in schema ``app``;
- ``"Odd.Name"``: double quotes keep dots, colons, capitals and spaces;
  two double quotes inside quotes are one double quote;
- in a pattern only: ``*`` alone is every table of every schema, and ``*``
  and ``?`` in an unquoted part are shell-style wildcards (``app.*``,
  ``order_*``, ``*.audit``). Inside quotes they are plain characters.

This module is pure: no I/O, and no walex module but the event types.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from .events import Source

__all__ = ["TablePattern", "parse_pattern", "parse_table_name", "quote_name", "split_names"]

_SCHEMA_GLOB = 1
_TABLE_GLOB = 2
_WILDCARDS = frozenset("*?")


class TablePattern(NamedTuple):
    """A table pattern: which schema and which table, ``None`` for any.

    Attributes:
        schema: the schema's name or wildcard pattern; ``None``: any schema.
        table: the table's name or wildcard pattern; ``None``: any table.
        globs: which of the two hold unquoted wildcards (bit 1: schema,
            bit 2: table); a name without wildcards is matched as it is.
    """

    schema: str | None
    table: str | None
    globs: int = 0

    def matches(self, schema: str | Source | None, table: str | None = None) -> bool:
        """Whether a table falls under this pattern.

        Args:
            schema: the table's schema, or the :class:`~walex.Source` of a
                change (``None``, a logical message, matches no pattern).
            table: the table's name, when *schema* is a name.
        """
        if schema is None:
            return False
        if isinstance(schema, str):
            assert table is not None, "give the table's name with its schema's"
            return self._matches(schema, table)
        return self._matches(schema.schema, schema.table)

    def _matches(self, schema: str, table: str) -> bool:
        s, t, globs = self
        if s is not None and not (fnmatchcase(schema, s) if globs & _SCHEMA_GLOB else s == schema):
            return False
        return t is None or (fnmatchcase(table, t) if globs & _TABLE_GLOB else t == table)

    @property
    def exact(self) -> bool:
        """Whether the pattern names one table (no ``*``, no wildcard)."""
        return self.schema is not None and self.table is not None and not self.globs

    def __str__(self) -> str:
        if self.schema is None and self.table is None:
            return "*"
        schema = "*" if self.schema is None else _show(self.schema, self.globs & _SCHEMA_GLOB)
        table = "*" if self.table is None else _show(self.table, self.globs & _TABLE_GLOB)
        return f"{schema}.{table}"


def quote_name(name: str) -> str:
    """*name* as this grammar reads it back: bare when it can be, else in double quotes."""
    if name.isidentifier() and name == name.lower():
        return name
    return '"' + name.replace('"', '""') + '"'


def _show(name: str, glob: int) -> str:
    return name if glob else quote_name(name)


def _split(text: str) -> list[tuple[str, bool]]:
    """Split on dots (or a colon) outside double quotes: each part, and whether
    some of it was unquoted and held a wildcard."""
    parts: list[tuple[str, bool]] = []
    current: list[str] = []
    quoted = was_quoted = glob = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"':
                if text[i + 1 : i + 2] == '"':
                    current.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                current.append(ch)
        elif ch == '"':
            quoted = was_quoted = True
        elif ch in ".:":
            parts.append(("".join(current), glob))
            current = []
            glob = was_quoted = False
        else:
            glob = glob or ch in _WILDCARDS
            current.append(ch)
        i += 1
    if quoted:
        raise ValueError(f"unbalanced double quote in table name {text!r}")
    last = "".join(current)
    if last == "" and not was_quoted and parts:
        raise ValueError(f"empty name in {text!r}")
    parts.append((last, glob))
    return parts


def parse_pattern(
    pattern: str | tuple[str, str] | TablePattern,
    *,
    bare: Literal["table", "schema"] = "table",
    schema: str = "public",
) -> TablePattern:
    """Read a table pattern.

    Args:
        pattern: ``"todo"``, ``"app.todo"``, ``"app:todo"``, ``"app.*"``,
            ``"order_*"``, ``"*"``, a quoted name (``'"Odd Table"'``) or a
            ``(schema, table)`` pair (``"*"`` for any).
        bare: what a name without a schema means: ``"table"`` (a table in
            *schema*, the rule for subscriptions, handlers and routes) or
            ``"schema"`` (every table of that schema, WalEx's ``matches?``).
        schema: the schema of a bare table name.

    Raises:
        ValueError: the pattern is empty or malformed.
    """
    if isinstance(pattern, TablePattern):
        return pattern
    if isinstance(pattern, tuple):
        s, t = pattern
        return TablePattern(None if s == "*" else s, None if t == "*" else t)
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"a table pattern must be a non-empty string, not {pattern!r}")
    text = pattern.strip()
    if text == "*":
        return TablePattern(None, None)
    parts = _split(text)
    if len(parts) == 1:
        ((name, glob),) = parts
        if bare == "schema":
            return _pattern(name, glob, None, False)
        return TablePattern(schema, name, _TABLE_GLOB if glob else 0)
    if len(parts) == 2:
        (s, s_glob), (t, t_glob) = parts
        if not s:
            raise ValueError(f"empty schema in table pattern {pattern!r}")
        return _pattern(s, s_glob, t, t_glob)
    raise ValueError(f"table pattern {pattern!r} has more than one dot; quote names with dots")


def _pattern(schema: str, s_glob: bool, table: str | None, t_glob: bool) -> TablePattern:
    # A part that is only "*" means any; other wildcards make a glob.
    any_schema = s_glob and schema == "*"
    any_table = table is None or (t_glob and table == "*")
    globs = (_SCHEMA_GLOB if s_glob and not any_schema else 0) | (
        _TABLE_GLOB if t_glob and not any_table else 0
    )
    return TablePattern(None if any_schema else schema, None if any_table else table, globs)


def parse_table_name(text: str) -> tuple[str | None, str]:
    """Read the name of one table: ``(schema, table)``, *schema* ``None`` when not given.

    The same grammar as :func:`parse_pattern`, without wildcards.

    Raises:
        ValueError: the name is empty or malformed, or is a pattern.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a table name must be a non-empty string, not {text!r}")
    parts = _split(text.strip())
    if any(glob for _, glob in parts):
        raise ValueError(f"{text!r} is a pattern; name one table (quote a name that holds * or ?)")
    if len(parts) == 1:
        return None, parts[0][0]
    if len(parts) == 2:
        (schema, _), (table, _) = parts
        if not schema or not table:
            raise ValueError(f"{text!r} is not a table name")
        return schema, table
    raise ValueError(f"table name {text!r} has more than one dot; quote names with dots")


def split_names(text: str) -> list[str]:
    """A comma-separated list of names or patterns, split on commas outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted  # "" inside quotes toggles twice: still quoted
        if ch == "," and not quoted:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return [name for name in out if name]

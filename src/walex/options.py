"""The engine's options, in one place: :class:`StreamOptions`.

Every option of :func:`walex.connect` is a field here, with its default, its
check and a line of help. :func:`walex.connect` takes the same keywords
(typed, checked against this class by the tests), the app's settings
(keyword arguments, ``WALEX_*`` variables, TOML files: :mod:`walex.config`)
are derived from the fields, and docs/engine.md lists each of them (checked
by the tests too). This module checks values; it does nothing with them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigurationError, conninfo_error
from .lsn import LSN

__all__ = ["SLOT_NAME_RULE", "OptionSpec", "StreamOptions", "Target", "option_specs"]

#: What Postgres accepts as a replication slot name, in words.
SLOT_NAME_RULE = "1 to 63 lower-case letters, digits and underscores"
_SLOT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _meta(kind: str, help: str, *, minimum: float | None = None, **extra: Any) -> dict[str, Any]:
    """What the settings need to know of a field."""
    return {"kind": kind, "help": help, "minimum": minimum, **extra}


_BOOL = _meta("bool", "true or false")
_SECONDS = _meta("float", "seconds, more than 0", minimum=0.001)


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """How a stream reads its slot. See docs/engine.md for each option.

    Raises:
        ConfigurationError: a value is wrong (when made), naming it.
    """

    create_slot: bool = field(default=True, metadata=_BOOL)
    start_lsn: LSN | str | None = field(
        default=None, metadata=_meta("lsn", 'an LSN such as "16/B374D848"')
    )
    binary: bool = field(default=False, metadata=_BOOL)
    streaming: bool = field(default=False, metadata=_BOOL)
    two_phase: bool = field(default=False, metadata=_BOOL)
    origin: Literal["none", "any"] | None = field(
        default=None, metadata=_meta("choice", '"none" or "any"', choices=("none", "any"))
    )
    messages: bool = field(default=True, metadata=_BOOL)
    max_batch_events: int = field(
        default=5000, metadata=_meta("int", "a whole number of at least 1", minimum=1)
    )
    max_batch_bytes: int = field(
        default=64 << 20, metadata=_meta("int", "a size in bytes, at least 1", minimum=1)
    )
    status_interval: float = field(default=10.0, metadata=_SECONDS)
    receive_timeout: float | None = field(
        default=60.0, metadata=_meta("float", "seconds, more than 0", minimum=0.001, nullable=True)
    )
    allow_gap: bool = field(default=False, metadata=_BOOL)
    wait_for_slot: bool = field(default=True, metadata=_BOOL)
    standby_retry: float = field(default=5.0, metadata=_SECONDS)
    reconnect: bool = field(default=True, metadata=_BOOL)
    max_reconnect_delay: float = field(default=30.0, metadata=_meta("float", "seconds", minimum=0))
    connect_timeout: float = field(default=30.0, metadata=_SECONDS)
    spool_dir: str | os.PathLike[str] | None = field(
        default=None, metadata=_meta("str", "a directory for streamed transactions")
    )
    heartbeat_interval: float | None = field(default=None, metadata=_SECONDS)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and (f.default is None or f.metadata.get("nullable")):
                continue  # off, or not given
            fixed = _check(f.name, value, f.metadata)
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)


def _check(name: str, value: Any, meta: Any) -> Any:
    kind = meta["kind"]
    bad = ConfigurationError(f"{name} must be {meta['help']}, not {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "lsn":
        if isinstance(value, str):
            try:
                return LSN.parse(value)
            except ValueError as exc:
                raise ConfigurationError(f"start_lsn: {exc}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return value if isinstance(value, LSN) else LSN(value)
            except ValueError as exc:
                raise ConfigurationError(f"start_lsn: {exc}") from None
        raise bad
    if kind == "choice":
        if value not in meta["choices"]:
            raise ConfigurationError(f"{name} must be 'none', 'any' or None, not {value!r}")
        return value
    if kind in ("int", "float"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            ok = ok or isinstance(value, float)
        minimum = meta["minimum"]
        if not ok or (minimum is not None and value < minimum):
            raise bad
        return float(value) if kind == "float" and type(value) is not float else value
    if kind == "str":
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unknown option kind {kind!r}")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One option as the settings see it: its kind, what it accepts, its default."""

    name: str
    kind: str
    help: str
    default: Any
    minimum: float | None = None
    choices: tuple[str, ...] = ()


def option_specs() -> list[OptionSpec]:
    """Every option of :class:`StreamOptions`, in order."""
    return [
        OptionSpec(
            f.name,
            f.metadata["kind"],
            f.metadata["help"],
            None if f.default is MISSING else f.default,
            f.metadata["minimum"],
            f.metadata.get("choices", ()),
        )
        for f in fields(StreamOptions)
    ]


@dataclass(frozen=True, slots=True)
class Target:
    """What a stream reads: the database, the publications and the slot, checked.

    Made by :meth:`check`.
    """

    dsn: str
    publications: tuple[str, ...]
    slot: str
    durable: bool

    @classmethod
    def check(
        cls, dsn: str, publication: str | Sequence[str], slot: str | None, durable: bool
    ) -> Target:
        """Check the arguments of :func:`walex.connect` that say what to read.

        A temporary slot without a name gets a random one.

        Raises:
            ConfigurationError: saying which argument is wrong and what it takes.
        """
        if not isinstance(dsn, str):
            raise ConfigurationError("dsn must be a libpq connection string or URL (a str)")
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise conninfo_error(exc) from None
        if "replication" in params:
            raise ConfigurationError("leave 'replication' out of the connection string")
        pubs = [publication] if isinstance(publication, str) else list(publication)
        if not pubs or not all(isinstance(p, str) and p for p in pubs):
            raise ConfigurationError(
                "publication must be a publication name or a non-empty list of names"
            )
        if not isinstance(durable, bool):
            raise ConfigurationError(f"durable must be true or false, not {durable!r}")
        if slot is None:
            if durable:
                raise ConfigurationError(
                    f"a durable slot needs a name: pass slot='my_app' ({SLOT_NAME_RULE})"
                )
            slot = f"walex_tmp_{secrets.token_hex(6)}"
        if not valid_slot_name(slot):
            raise ConfigurationError(f"slot name {slot!r} is not valid: use {SLOT_NAME_RULE}")
        return cls(dsn, tuple(pubs), slot, durable)


def valid_slot_name(name: object) -> bool:
    """Whether Postgres accepts *name* as a replication slot name."""
    return isinstance(name, str) and 0 < len(name) <= 63 and set(name) <= _SLOT_CHARS

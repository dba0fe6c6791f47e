"""Settings for a :class:`~walex.WalEx` app: keyword arguments, environment, TOML.

It owns reading and checking an app's settings; it must not connect, and takes
the engine's options from :mod:`walex.options` rather than listing them.

One table of settings (:data:`SETTINGS`) serves all three sources, so a key
means the same thing and is checked the same way wherever it comes from:

- keyword arguments: ``WalEx(name="shop", url=..., publication="events")``;
- environment variables: ``WALEX_`` + the key in upper case
  (``WALEX_URL``, ``WALEX_PUBLICATION=events,audit``,
  ``WALEX_DURABLE_SLOT=false``), read by :meth:`WalEx.from_env` and
  :meth:`WalEx.from_config`;
- a TOML file: the same keys at the top level, plus ``[[handlers]]`` and
  ``[[destinations]]`` tables (see ``docs/configuration.md``).

Later sources win: file, then environment, then keyword arguments. Every
value is checked before anything connects; a wrong one raises
:class:`~walex.errors.ConfigurationError` naming the key and what it
accepts. The password is kept out of every repr and log line.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from . import _accel
from .errors import ConfigurationError, mask_dsn
from .filters import parse_relation
from .options import option_specs
from .routing import POLICIES, ErrorPolicy

__all__ = [
    "ENGINE_OPTIONS",
    "ENV_PREFIX",
    "POLICIES",
    "SETTINGS",
    "ErrorPolicy",
    "FileConfig",
    "MetricsConfig",
    "Settings",
    "default_slot_name",
    "from_env",
    "import_object",
    "parse_listen",
    "read_file",
    "redact",
    "validate",
]

ENV_PREFIX = "WALEX_"
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: str  # str, int, float, bool, list, choice, dead_letter
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None


# Connection keys (become the libpq conninfo), the app's own keys, and the
# engine's options (handed to walex.connect as they are).
_CONNECTION = {
    "url": _Spec("str", "a libpq connection string or URL (postgresql://user@host:port/db)"),
    "hostname": _Spec("str", "the server's host name, IP address or socket directory"),
    "username": _Spec("str", "the user name"),
    "password": _Spec("str", "the password"),
    "port": _Spec("int", "the port, a whole number from 1 to 65535", minimum=1),
    "database": _Spec("str", "the database name"),
    "sslmode": _Spec("choice", "libpq's sslmode", _SSLMODES),
    "sslrootcert": _Spec("str", "a path: the CA certificates to verify the server with"),
    "sslcert": _Spec("str", "a path: the client certificate"),
    "sslkey": _Spec("str", "a path: the client certificate's key"),
}
_APP = {
    "name": _Spec("str", "the app's name: letters, digits and underscores"),
    "publication": _Spec("list", "a publication name, or a list of them"),
    "subscriptions": _Spec("list", 'table patterns: "todo", "app.todo", "app.*" or "*"'),
    "slot_name": _Spec("str", "1 to 63 lower-case letters, digits and underscores"),
    "durable_slot": _Spec("bool", "true or false"),
    "retries": _Spec("int", "the retries after a failed handler call: 0 or more", minimum=0),
    "retry_delay": _Spec("float", "seconds before the first retry (doubling after)", minimum=0),
    "max_retry_delay": _Spec("float", "the longest pause between retries, seconds", minimum=0),
    "on_error": _Spec("choice", "what to do when retries are used up", POLICIES),
    "dead_letter": _Spec("dead_letter", "a callable, or the path of a JSON-lines file"),
    "stop_timeout": _Spec("float", "seconds a graceful stop waits for handlers", minimum=0),
    "window_events": _Spec(
        "int", "the most events read and not yet delivered: at least 1", minimum=1
    ),
    "window_bytes": _Spec(
        "int", "the most bytes of changes read and not yet delivered: at least 1", minimum=1
    ),
}
# The engine's options come from the one place that defines them.
_ENGINE = {
    o.name: _Spec("str" if o.kind == "lsn" else o.kind, o.help, o.choices, o.minimum)
    for o in option_specs()
}
SETTINGS: dict[str, _Spec] = {**_CONNECTION, **_APP, **_ENGINE}
"""Every setting, by key: its kind and what it accepts."""

ENGINE_OPTIONS: tuple[str, ...] = tuple(_ENGINE)

_CONNINFO_KEYS = {
    "hostname": "host",
    "username": "user",
    "password": "password",
    "port": "port",
    "database": "dbname",
    "sslmode": "sslmode",
    "sslrootcert": "sslrootcert",
    "sslcert": "sslcert",
    "sslkey": "sslkey",
}
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True, slots=True)
class Settings:
    """A checked set of settings. Made by :func:`validate`.

    Attributes:
        name: the app's name.
        conninfo: the libpq connection string (holds the password: never
            printed; see :attr:`safe_conninfo`).
        publications: the publication names.
        subscriptions: the table patterns delivered to handlers.
        slot_name: the replication slot.
        durable_slot: a permanent slot (resume after a restart).
        retries: retries after a failed handler call.
        retry_delay: the first pause between attempts, in seconds.
        max_retry_delay: the longest pause.
        on_error: ``"stop"``, ``"skip"`` or ``"dead_letter"``.
        dead_letter: a callable or a file path, for ``on_error="dead_letter"``.
        stop_timeout: how long a graceful stop waits for running handlers.
        window_events: the most events read and not yet delivered to every
            destination (pipelined delivery).
        window_bytes: the most pgoutput bytes behind them.
        engine: the options handed to :func:`walex.connect`.
    """

    name: str
    conninfo: str = field(repr=False)
    publications: tuple[str, ...]
    subscriptions: tuple[str, ...]
    slot_name: str
    durable_slot: bool
    retries: int
    retry_delay: float
    max_retry_delay: float
    on_error: ErrorPolicy
    dead_letter: Callable[..., Any] | Path | None
    stop_timeout: float | None
    window_events: int
    window_bytes: int
    engine: Mapping[str, Any]

    @property
    def safe_conninfo(self) -> str:
        """The connection string with the password replaced by ``***``."""
        return redact(self.conninfo)

    def __repr__(self) -> str:
        return (
            f"Settings(name={self.name!r}, conninfo={self.safe_conninfo!r}, "
            f"publications={self.publications!r}, subscriptions={self.subscriptions!r}, "
            f"slot_name={self.slot_name!r}, durable_slot={self.durable_slot!r}, "
            f"on_error={self.on_error!r})"
        )


def redact(conninfo: str) -> str:
    """*conninfo* with any password replaced by ``***`` (see :func:`walex.admin.mask_dsn`)."""
    return mask_dsn(conninfo)


def _unknown(key: str, where: str) -> ConfigurationError:
    close = difflib.get_close_matches(key, SETTINGS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigurationError(f"unknown setting {key!r}{where}{hint}")


def _check(key: str, value: Any, from_text: bool) -> Any:
    """Check one value (parsing it first if it came as environment text)."""
    spec = SETTINGS[key]
    what = f"{key} must be {spec.help}"
    kind = spec.kind
    if value is None:
        return None
    if kind == "bool":
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        if not isinstance(value, bool):
            raise ConfigurationError(f"{what}, not {value!r}")
        return value
    if kind in ("int", "float"):
        if from_text and isinstance(value, str):
            try:
                value = int(value) if kind == "int" else float(value)
            except ValueError:
                raise ConfigurationError(f"{what}, not {value!r}") from None
        ok = (
            isinstance(value, int) and not isinstance(value, bool)
            if kind == "int"
            else isinstance(value, (int, float)) and not isinstance(value, bool)
        )
        if not ok or (spec.minimum is not None and value < spec.minimum):
            raise ConfigurationError(f"{what}, not {value!r}")
        if key == "port" and value > 65535:
            raise ConfigurationError(f"{what}, not {value!r}")
        return float(value) if kind == "float" else value
    if kind == "list":
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")] if from_text else [value]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigurationError(f"{what}, not {value!r}")
        if not items or not all(isinstance(v, str) and v for v in items):
            raise ConfigurationError(f"{what}, not {value!r}")
        return tuple(items)
    if kind == "choice":
        if value not in spec.choices:
            accepted = ", ".join(repr(c) for c in spec.choices)
            raise ConfigurationError(f"{key} must be one of {accepted}, not {value!r}")
        return value
    if kind == "dead_letter":
        if callable(value):
            return value
        if isinstance(value, (str, os.PathLike)) and os.fspath(value):
            return Path(value)
        raise ConfigurationError(f"{what}, not {value!r}")
    if not isinstance(value, str):
        raise ConfigurationError(f"{what}, not {value!r}")
    return value


def default_slot_name(name: str) -> str:
    """The slot an app named *name* uses: ``walex_<name>``, lower-case, [a-z0-9_]."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", name.lower())
    return f"walex_{cleaned}"[:63]


def validate(values: Mapping[str, Any], *, from_text: frozenset[str] = frozenset()) -> Settings:
    """Check *values* (setting → value) and return :class:`Settings`.

    Args:
        values: the settings; keys not in :data:`SETTINGS` are an error.
        from_text: keys whose values are environment text, to be parsed.

    Raises:
        ConfigurationError: naming the first wrong key and what it accepts.
    """
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in SETTINGS:
            raise _unknown(key, "")
        checked[key] = _check(key, value, key in from_text)

    name = checked.get("name") or "walex"
    if not _NAME.match(name):
        raise ConfigurationError(
            f"name must be letters, digits and underscores (it names the slot), not {name!r}"
        )
    pubs = checked.get("publication")
    if not pubs:
        raise ConfigurationError(
            "publication is required: the publication to read "
            "(CREATE PUBLICATION events FOR TABLE ...), or a list of them"
        )
    subs = checked.get("subscriptions") or ("*",)
    for pattern in subs:
        try:
            parse_relation(pattern)
        except ValueError as exc:
            raise ConfigurationError(f"subscriptions: {exc}") from None
    slot = checked.get("slot_name") or default_slot_name(name)
    if not re.match(r"^[a-z0-9_]{1,63}$", slot):
        raise ConfigurationError(
            f"slot_name must be 1 to 63 lower-case letters, digits and underscores, not {slot!r}"
        )
    on_error: ErrorPolicy = checked.get("on_error") or "stop"
    dead_letter = checked.get("dead_letter")
    if on_error == "dead_letter" and dead_letter is None:
        raise ConfigurationError(
            'on_error="dead_letter" needs dead_letter: a callable, or the path of a '
            "JSON-lines file to append the failed events to"
        )
    retry_delay = checked.get("retry_delay")
    max_retry_delay = checked.get("max_retry_delay")
    return Settings(
        name=name,
        conninfo=_conninfo(checked),
        publications=tuple(pubs),
        subscriptions=tuple(subs),
        slot_name=slot,
        durable_slot=True if checked.get("durable_slot") is None else checked["durable_slot"],
        retries=3 if checked.get("retries") is None else checked["retries"],
        retry_delay=0.5 if retry_delay is None else retry_delay,
        max_retry_delay=30.0 if max_retry_delay is None else max_retry_delay,
        on_error=on_error,
        dead_letter=dead_letter,
        stop_timeout=checked.get("stop_timeout"),
        window_events=checked.get("window_events") or 20_000,
        window_bytes=checked.get("window_bytes") or 8 << 20,
        engine={k: checked[k] for k in ENGINE_OPTIONS if checked.get(k) is not None},
    )


def _conninfo(checked: Mapping[str, Any]) -> str:
    parts = {
        libpq: str(checked[key])
        for key, libpq in _CONNINFO_KEYS.items()
        if checked.get(key) is not None
    }
    url = checked.get("url") or ""
    try:
        conninfo = make_conninfo(url, **parts)
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        # The message may quote the URL, password and all: leave it out.
        raise ConfigurationError(
            "url must be a libpq connection string or URL "
            f"(postgresql://user@host:port/db): {str(exc).split(':')[0]}"
        ) from None
    if "replication" in params:
        raise ConfigurationError("url: leave 'replication' out; walex sets it")
    return conninfo


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings found in ``WALEX_*`` environment variables (as text).

    Unknown ``WALEX_*`` names are an error, so that a typo does not pass
    silently. ``WALEX_TEST_*`` (the test suite's own) and ``WALEX_IMPL`` (which
    picks C or pure Python, see :mod:`walex._accel`) are not settings.

    Raises:
        ConfigurationError: for an unknown ``WALEX_*`` variable.
    """
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for var, value in env.items():
        if (
            not var.startswith(ENV_PREFIX)
            or var.startswith(ENV_PREFIX + "TEST_")
            or var == _accel.ENV_VAR
        ):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in SETTINGS:
            raise _unknown(key, f" (environment variable {var})")
        found[key] = value
    return found


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The ``[metrics]`` table of a settings file: serve ``/metrics`` and ``/healthz``.

    Attributes:
        host: the address to listen on (``127.0.0.1`` unless given).
        port: the TCP port.
        max_lag_bytes: ``/healthz`` fails past this lag (``None``: no limit).
        namespace: the metrics' prefix (``walex``).
    """

    host: str
    port: int
    max_lag_bytes: int | None = None
    namespace: str = "walex"


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a TOML file holds: settings, handlers, destinations and metrics.

    Attributes:
        path: the file.
        settings: setting → value, as written.
        handlers: the ``[[handlers]]`` tables.
        destinations: the ``[[destinations]]`` tables.
        metrics: the ``[metrics]`` table, checked; ``None`` when absent.
    """

    path: Path
    settings: dict[str, Any]
    handlers: list[dict[str, Any]]
    destinations: list[dict[str, Any]]
    metrics: MetricsConfig | None = None


_METRICS_KEYS = {"listen", "max_lag_bytes", "namespace"}


def _metrics(section: Any, where: str) -> MetricsConfig:
    if not isinstance(section, dict):
        raise ConfigurationError(f"{where}: metrics must be a [metrics] table")
    for key in section:
        if key not in _METRICS_KEYS:
            raise ConfigurationError(
                f"{where}: [metrics] has an unknown key {key!r}; accepted: {sorted(_METRICS_KEYS)}"
            )
    listen = section.get("listen")
    if not isinstance(listen, str) or not listen.strip():
        raise ConfigurationError(
            f'{where}: [metrics] needs listen = "HOST:PORT" (e.g. "127.0.0.1:9187")'
        )
    host, port = parse_listen(listen, f"{where}: [metrics] listen")
    lag = section.get("max_lag_bytes")
    if lag is not None and (not isinstance(lag, int) or isinstance(lag, bool) or lag < 0):
        raise ConfigurationError(f"{where}: [metrics] max_lag_bytes must be a number of bytes")
    namespace = section.get("namespace", "walex")
    if not isinstance(namespace, str) or not _NAME.match(namespace):
        raise ConfigurationError(f"{where}: [metrics] namespace must be letters, digits and _")
    return MetricsConfig(host, port, lag, namespace)


def parse_listen(text: str, what: str = "listen") -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[::1]:PORT"`` or ``":PORT"`` (127.0.0.1) → ``(host, port)``.

    Raises:
        ConfigurationError: naming *what*.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ConfigurationError(f"{what} must be HOST:PORT, not {text!r}")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(f"{what} must be HOST:PORT, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"{what}: the port must be 0 to 65535, not {port}")
    return host, port


def read_file(path: str | os.PathLike[str]) -> FileConfig:
    """Read a TOML settings file.

    Raises:
        ConfigurationError: the file is missing, not TOML, or has an unknown key.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the settings file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{p} is not valid TOML: {exc}") from None
    # A [walex] table is accepted too, for files shared with other tools.
    if isinstance(data.get("walex"), dict):
        data = {**data, **data.pop("walex")}
    handlers = data.pop("handlers", [])
    destinations = data.pop("destinations", [])
    metrics = data.pop("metrics", None)
    for label, items in (("handlers", handlers), ("destinations", destinations)):
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigurationError(f"{p}: {label} must be [[{label}]] tables")
    for key in data:
        if key not in SETTINGS:
            raise _unknown(key, f" in {p}")
    return FileConfig(
        p,
        dict(data),
        list(handlers),
        list(destinations),
        _metrics(metrics, str(p)) if metrics is not None else None,
    )


def import_object(ref: str, key: str) -> Any:
    """Import ``"package.module:name"`` (``name`` may be dotted).

    Args:
        ref: the reference.
        key: the setting it came from, for the error message.

    Raises:
        ConfigurationError: naming *key* and what went wrong.
    """
    if not isinstance(ref, str) or ":" not in ref:
        raise ConfigurationError(
            f"{key} must be 'module:name' (e.g. 'myapp.events:welcome'), not {ref!r}"
        )
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{key}: cannot import module {module_name!r}: {exc}") from exc
    except Exception as exc:
        # The module itself failed while loading: one line, the traceback under --debug.
        raise ConfigurationError(
            f"{key}: importing module {module_name!r} raised {type(exc).__name__}: {exc} "
            "(walex --debug ... shows where)"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{key}: module {module_name!r} has no {attr!r}") from None
    return obj

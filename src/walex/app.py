"""The WalEx app: handlers and destinations on the changes of a database.

This module owns the app's settings, registration and lifecycle (start,
stop, signals). It does not route, retry or apply an error policy itself:
each handler and destination becomes a :class:`walex.routing.Route`, and a
:class:`walex.routing.Dispatcher` runs every batch through them.

:class:`WalEx` reads one replication slot with the engine
(:func:`walex.connect`) and hands each batch to the handlers and
destinations registered for its tables, in commit order::

    app = WalEx(name="shop", url="postgresql://postgres@localhost/shop",
                publication="events", subscriptions=["user_account", "todo"])

    @app.on_insert("user_account")
    async def welcome(events: list[Event]) -> None:
        for event in events:
            await send_welcome_email(event.new_record["email"])

    app.run()

The delivery guarantee holds through the app: a transaction is confirmed to
Postgres only once every handler, every ``functions`` pipeline and every
destination that it concerns has finished (or the error policy has disposed
of a failure: skipped, or written to the dead-letter sink). A handler that
keeps failing under the ``"stop"`` policy stops the app with
:class:`~walex.errors.HandlerError`, and the transaction is delivered again
after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shlex
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar

from . import config as _config
from .admin import connect_sql, publication_tables
from .errors import ConfigurationError, HandlerError, WalexError
from .events import Batch, Event
from .names import TablePattern, parse_pattern
from .routing import (
    ALL_TYPES,
    TABLE_TYPES,
    Abandoned,
    DeadLetter,
    Destination,
    Dispatcher,
    Pipeline,
    RetryPolicy,
    Route,
    Unmatched,
    name_of,
    table_name,
    unmatched_patterns,
)
from .serve import run, serve
from .stream import Stream, connect

__all__ = [
    "DeadLetter",
    "Destination",
    "HandlerType",
    "Observer",
    "WalEx",
    "run",
    "serve",
]

logger = logging.getLogger(__name__)

HandlerType = Literal["insert", "update", "delete", "truncate", "event", "message"]
"""What a handler is registered for; ``"event"`` is every table change."""

F = TypeVar("F", bound=Callable[..., Any])
_FILTER_KEYS = frozenset(
    {"unwatched_fields", "unwatched_records", "where", "columns", "exclude_columns"}
)


class Observer(Protocol):
    """What an app tells observers (metrics): both methods are optional.

    ``on_batch(batch, seconds)`` after each batch is handled;
    ``on_handler(name, table, event_type, seconds, error)`` after each call
    of a handler, function or destination (each attempt), with the
    exception or ``None``; ``track_stream(stream)`` when the app's stream
    opens and ``untrack_stream(stream)`` when it closes (for lag and health:
    :class:`walex.metrics.Metrics` has all four). They run on the event
    loop: keep them quick. An exception in an observer is logged and
    otherwise ignored.
    """


class WalEx:
    """An app: handlers and destinations on the changes of one database.

    Args:
        name: names the app in logs; the default slot is ``walex_<name>``.
        url: a libpq connection string or URL; the parts below, if given,
            override what it says.
        hostname, username, password, port, database: the connection by parts.
        sslmode, sslrootcert, sslcert, sslkey: TLS, as in libpq (which
            also reads ``PGSSLMODE`` and friends).
        publication: the publication to read, or a list of them.
        subscriptions: the tables to deliver to handlers: ``["user_account",
            "todo"]`` (bare names are in ``public``), ``"app.*"``, or ``["*"]``
            (default) for every table of the publication.
        slot_name: the replication slot; default ``walex_<name>``.
        durable_slot: ``True`` (default): a permanent slot, so that a
            restart resumes after the last handled transaction. ``False``: a
            temporary slot; changes made while the app is down are lost.
        retries: retries after a failed call (default 3).
        retry_delay: the first pause between attempts (0.5 s), doubling.
        max_retry_delay: the longest pause (30 s).
        on_error: when retries are used up: ``"stop"`` (default),
            ``"skip"`` or ``"dead_letter"``.
        dead_letter: for ``"dead_letter"``: a callable taking a
            :class:`DeadLetter` (sync or async), or a file path to append
            JSON lines to.
        stop_timeout: how long a graceful stop waits for running handlers
            before cancelling them (default: as long as they take).
        observers: objects told about each batch and handler call
            (:class:`Observer`).
        message_middleware: WalEx's hook: called (and awaited, if it returns
            an awaitable) with each batch before any handler sees it. The
            stream waits for it, so it can hold back the flow. If it raises,
            the app stops with :class:`~walex.errors.HandlerError`.
        **options: the engine's options (``binary``, ``streaming``,
            ``two_phase``, ``max_batch_events``, ``start_lsn``, ...; see
            :class:`walex.Stream`).

    Raises:
        ConfigurationError: a setting is wrong (before anything connects).
    """

    def __init__(
        self,
        name: str = "walex",
        *,
        observers: Iterable[object] = (),
        message_middleware: Callable[[Batch], Any] | None = None,
        **settings: Any,
    ) -> None:
        self._init(_config.validate({"name": name, **settings}), observers, message_middleware)

    def _init(
        self,
        settings: _config.Settings,
        observers: Iterable[object],
        message_middleware: Callable[[Batch], Any] | None = None,
    ) -> None:
        if message_middleware is not None and not callable(message_middleware):
            raise ConfigurationError("message_middleware must be a callable taking a Batch")
        self._middleware = message_middleware
        self.settings = settings
        self.name = settings.name
        self._subscriptions = [parse_pattern(p) for p in settings.subscriptions]
        # One retry policy for handlers, functions and destinations alike.
        self._retry_policy = RetryPolicy(
            retries=settings.retries,
            initial=min(settings.retry_delay, settings.max_retry_delay),
            maximum=settings.max_retry_delay,
        )
        self._observers = list(observers)
        self._dispatcher = Dispatcher(
            name=self.name,
            subscriptions=self._subscriptions,
            observers=self._observers,
            stop_message=(
                "The app stops; this transaction is not confirmed and is delivered again "
                "when the app restarts"
                + ("" if settings.durable_slot else " (with a durable slot only)")
            ),
        )
        self._routes: list[Route] = self._dispatcher.routes
        self._stream: Stream | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        self._pipeline: Pipeline | None = None  # while the app runs
        self._forced = False  # a forced stop cut a batch short: it is not confirmed
        self.error: BaseException | None = None
        self._make_stream()  # the engine checks its own options now, not at start

    # -- construction from settings ------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WalEx:
        """An app from ``WALEX_*`` environment variables (keyword arguments win).

        Example::

            # WALEX_URL=postgresql://... WALEX_PUBLICATION=events
            app = WalEx.from_env(name="shop")
        """
        env = _config.from_env(environ)
        observers = overrides.pop("observers", ())
        middleware = overrides.pop("message_middleware", None)
        values: dict[str, Any] = {**env, **overrides}
        text = frozenset(env) - frozenset(overrides)
        app = cls.__new__(cls)
        app._init(_config.validate(values, from_text=text), observers, middleware)
        return app

    @classmethod
    def from_config(
        cls,
        path: str | os.PathLike[str],
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> WalEx:
        """An app from a TOML file, with its handlers and destinations.

        The file's settings are overridden by ``WALEX_*`` environment
        variables, and those by keyword arguments. Handlers and functions
        are named ``"module:function"``; see ``docs/configuration.md``.

        Raises:
            ConfigurationError: naming the key that is wrong.
        """
        file = _config.read_file(path)
        env = _config.from_env(environ)
        observers = overrides.pop("observers", ())
        middleware = overrides.pop("message_middleware", None)
        values = {**file.settings, **env, **overrides}
        text = frozenset(env) - frozenset(overrides)
        app = cls.__new__(cls)
        app._init(_config.validate(values, from_text=text), observers, middleware)
        for i, section in enumerate(file.handlers):
            app._handler_from_config(section, f"{file.path}: handlers[{i}]")
        for i, section in enumerate(file.destinations):
            app._destination_from_config(section, f"{file.path}: destinations[{i}]")
        return app

    def _handler_from_config(self, section: Mapping[str, Any], where: str) -> None:
        known = {
            "handler",
            "table",
            "type",
            "prefix",
            "functions",
            "on_error",
            "retries",
            *_FILTER_KEYS,
        }
        for key in section:
            if key not in known:
                raise ConfigurationError(f"{where}: unknown key {key!r}; accepted: {sorted(known)}")
        if "handler" not in section:
            raise ConfigurationError(f"{where}: handler is required ('module:function')")
        fn = _config.import_object(section["handler"], f"{where}.handler")
        type_ = section.get("type", "event")
        if type_ not in (*TABLE_TYPES, "event", "message"):
            raise ConfigurationError(
                f"{where}.type must be insert, update, delete, truncate, event or message, "
                f"not {type_!r}"
            )
        where_fn = section.get("where")
        kwargs: dict[str, Any] = {k: section[k] for k in _FILTER_KEYS if k in section}
        if where_fn is not None:
            kwargs["where"] = _config.import_object(where_fn, f"{where}.where")
        functions = section.get("functions", [])
        if not isinstance(functions, list):
            raise ConfigurationError(f"{where}.functions must be a list of 'module:function'")
        kwargs["functions"] = [
            _config.import_object(f, f"{where}.functions[{j}]") for j, f in enumerate(functions)
        ]
        self.add_handler(
            fn,
            type_,
            section.get("table", "*"),
            prefix=section.get("prefix"),
            on_error=section.get("on_error"),
            retries=section.get("retries"),
            **kwargs,
        )

    def _destination_from_config(self, section: Mapping[str, Any], where: str) -> None:
        try:
            from . import destinations
        except ImportError as exc:
            raise ConfigurationError(
                f"{where}: destinations are not available in this walex install ({exc})"
            ) from exc
        factory = getattr(destinations, "from_config", None)
        if factory is None:
            raise ConfigurationError(f"{where}: walex.destinations has no from_config()")
        routing = {"tables", "types", "on_error", "retries"}
        dest = factory({k: v for k, v in section.items() if k not in routing})
        self.add_destination(
            dest,
            tables=section.get("tables", ["*"]),
            types=section.get("types"),
            on_error=section.get("on_error"),
            retries=section.get("retries"),
        )

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"WalEx(name={s.name!r}, conninfo={s.safe_conninfo!r}, "
            f"publication={list(s.publications)!r}, slot_name={s.slot_name!r}, "
            f"durable_slot={s.durable_slot!r}, handlers={len(self._routes)})"
        )

    def _make_stream(self) -> Stream:
        s = self.settings
        return connect(
            s.conninfo,
            publication=list(s.publications),
            slot=s.slot_name,
            durable=s.durable_slot,
            **s.engine,
        )

    # -- the publication's tables -------------------------------------------------

    async def _check_tables(self) -> set[tuple[str, str]] | None:
        """Refuse table patterns that match no table of the publication: they never fire.

        Returns:
            The publications' tables, ``None`` when a publication is missing
            (the stream reports that, with its fix).
        """
        s = self.settings
        conn = await connect_sql(
            s.conninfo, s.engine.get("connect_timeout", 30.0), application_name="walex-app"
        )
        try:
            published: set[tuple[str, str]] = set()
            for pub in s.publications:
                found = await publication_tables(conn, pub)
                if found is None:
                    return None  # the stream reports the missing publication, with its fix
                published |= found[1]
            problems = unmatched_patterns(self._routes, self._subscriptions, published)
            if not problems:
                return published
            cur = await conn.execute(_TABLES_SQL)
            existing = [(r[0], r[1]) for r in await cur.fetchall()]
        finally:
            await conn.close()
        raise ConfigurationError(self._unmatched_message(problems, published, existing))

    def _unmatched_message(
        self,
        problems: Sequence[Unmatched],
        published: set[tuple[str, str]],
        existing: Sequence[tuple[str, str]],
    ) -> str:
        s = self.settings
        pub = s.publications[0]
        pubs = ", ".join(repr(p) for p in s.publications)
        lines = [f"{self.name}: table patterns that match no table, so they would never fire:"]
        for problem in problems:
            pattern = problem.pattern
            head = f"{problem.owner}: table pattern {str(pattern)!r}"
            if problem.left_out:
                names = ", ".join(table_name(*t) for t in problem.left_out)
                lines.append(
                    f"- {head} matches {names} of publication {pubs}, which subscriptions "
                    f"({', '.join(s.subscriptions)}) leave out: add it there"
                )
                continue
            candidates = sorted(t for t in existing if pattern.matches(*t) and t not in published)
            what = f"- {head} matches no table of publication {pubs}"
            if candidates:
                tables = [table_name(*t) for t in candidates]
                unsubscribed = [t for t in candidates if not self._dispatcher.subscribed(*t)]
                lines.append(
                    f"{what}; add {'it' if len(candidates) == 1 else 'them'} with: "
                    + _setup_command(s.safe_conninfo, pub, tables)
                    + (
                        " (and to subscriptions: "
                        + ", ".join(table_name(*t) for t in unsubscribed)
                        + ")"
                        if unsubscribed
                        else ""
                    )
                )
            elif pattern.exact:
                lines.append(
                    f"{what}, and the database has no such table: create it, then add it "
                    "with: " + _setup_command(s.safe_conninfo, pub, [str(pattern)])
                )
            else:
                lines.append(
                    f"{what}, nor any table of the database: correct the pattern, or create "
                    "the table and add it with: "
                    + _setup_command(s.safe_conninfo, pub, ["SCHEMA.TABLE"])
                )
        return "\n".join(lines)

    # -- registration ------------------------------------------------------

    def add_handler(
        self,
        handler: Callable[..., Any],
        type: HandlerType,
        table: str | Sequence[str] = "*",
        filters: Mapping[str, Any] | None = None,
        *,
        prefix: str | None = None,
        unwatched_fields: Collection[str] | None = None,
        unwatched_records: Mapping[str, Any] | None = None,
        where: Callable[[Event], bool] | None = None,
        columns: Collection[str] | None = None,
        exclude_columns: Collection[str] | None = None,
        functions: Sequence[Callable[[Event], Any]] = (),
        on_error: str | None = None,
        retries: int | None = None,
        name: str | None = None,
    ) -> None:
        """Register *handler* (what the decorators do).

        Args:
            handler: a function (sync or async) taking ``list[Event]``, or
                one ``Event`` if its first parameter is annotated ``Event``.
            type: ``"insert"``, ``"update"``, ``"delete"``, ``"truncate"``,
                ``"event"`` (all four) or ``"message"``.
            table: a table pattern (``"todo"``, ``"app.todo"``, ``"app.*"``,
                ``"*"``) or a list of them.
            filters: WalEx's filter map, the same as the keywords below.
            prefix: for messages, the prefix to match (``None``: every message).
            unwatched_fields: drop updates that change only these columns.
            unwatched_records: drop events whose record has all these values.
            where: keep only events for which this returns true.
            columns: hand over only these columns of each record.
            exclude_columns: hand over every column but these.
            functions: run on each event after the handler, in order.
            on_error: this handler's policy, instead of the app's.
            retries: this handler's retries, instead of the app's.
            name: names the handler in logs (default ``module:function``).

        Raises:
            ConfigurationError: a wrong argument or a table the app does not subscribe to.
        """
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, not {handler!r}")
        label = name or name_of(handler)
        if type == "event":
            types = TABLE_TYPES
        elif type in ALL_TYPES:
            types = frozenset({type})
        else:
            raise ConfigurationError(
                f"type must be insert, update, delete, truncate, event or message, not {type!r}"
            )
        opts: dict[str, Any] = dict(filters or {})
        for key in opts:
            if key not in _FILTER_KEYS:
                raise ConfigurationError(
                    f"{label}: unknown filter {key!r}; accepted: {sorted(_FILTER_KEYS)}"
                )
        opts.setdefault("unwatched_fields", unwatched_fields)
        opts.setdefault("unwatched_records", unwatched_records)
        opts.setdefault("where", where)
        opts.setdefault("columns", columns)
        opts.setdefault("exclude_columns", exclude_columns)
        self._check_filters(label, opts)
        for f in functions:
            if not callable(f):
                raise ConfigurationError(f"{label}: functions must be callables, not {f!r}")
        tables = [] if type == "message" else self._tables(label, table)
        self._dispatcher.add(
            Route(
                handler,
                name=label,
                types=types,
                tables=tables,
                prefix=prefix,
                functions=functions,
                **self._error_handling(label, on_error, retries),
                **opts,
            )
        )

    def _check_filters(self, label: str, opts: Mapping[str, Any]) -> None:
        for key in ("unwatched_fields", "columns", "exclude_columns"):
            value = opts.get(key)
            if value is not None and (
                isinstance(value, str) or not all(isinstance(c, str) for c in value)
            ):
                raise ConfigurationError(f"{label}: {key} must be a collection of column names")
        records = opts.get("unwatched_records")
        if records is not None and not isinstance(records, Mapping):
            raise ConfigurationError(f"{label}: unwatched_records must be a mapping column → value")
        where = opts.get("where")
        if where is not None and not callable(where):
            raise ConfigurationError(f"{label}: where must be a callable taking an Event")
        if opts.get("columns") is not None and opts.get("exclude_columns") is not None:
            raise ConfigurationError(f"{label}: give columns or exclude_columns, not both")

    def _tables(self, label: str, table: str | Sequence[str]) -> list[TablePattern]:
        patterns = [table] if isinstance(table, str) else list(table)
        if not patterns:
            raise ConfigurationError(f"{label}: table must name at least one table pattern")
        out = []
        for pattern in patterns:
            try:
                rel = parse_pattern(pattern)
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"{label}: table: {exc}") from None
            # A pattern with wildcards is checked against the publication at start.
            schema, name = rel.schema, rel.table
            if rel.exact and not self._dispatcher.subscribed(schema or "", name or ""):
                subs = ", ".join(self.settings.subscriptions)
                raise ConfigurationError(
                    f"{label} watches {rel}, which is not in subscriptions ({subs}): "
                    "add it there, or it never fires"
                )
            out.append(rel)
        return out

    def _error_handling(
        self, label: str, on_error: str | None, retries: int | None
    ) -> dict[str, Any]:
        """A route's ``on_error``, ``policy`` and ``dead_letter``: its own, else the app's."""
        if on_error is not None and on_error not in _config.POLICIES:
            raise ConfigurationError(
                f"{label}: on_error must be 'stop', 'skip' or 'dead_letter', not {on_error!r}"
            )
        if on_error == "dead_letter" and self.settings.dead_letter is None:
            raise ConfigurationError(
                f"{label}: on_error='dead_letter' needs the app's dead_letter setting "
                "(a callable or a JSON-lines file path)"
            )
        if retries is not None and (
            not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
        ):
            raise ConfigurationError(f"{label}: retries must be a whole number, 0 or more")
        return {
            "on_error": on_error or self.settings.on_error,
            "policy": self._retry_policy.with_retries(
                self._retry_policy.retries if retries is None else retries
            ),
            "dead_letter": self.settings.dead_letter,
        }

    def _decorator(
        self, type: HandlerType, table: str | Sequence[str], filters: Any, kwargs: Any
    ) -> Callable[[F], F]:
        def register(fn: F) -> F:
            self.add_handler(fn, type, table, filters, **kwargs)
            return fn

        return register

    def on_insert(
        self, table: str | Sequence[str] = "*", filters: Mapping[str, Any] | None = None, **kw: Any
    ) -> Callable[[F], F]:
        """Register a handler for inserts into *table* (see :meth:`add_handler`).

        Example::

            @app.on_insert("user_account")
            async def welcome(events: list[Event]) -> None: ...
        """
        return self._decorator("insert", table, filters, kw)

    def on_update(
        self, table: str | Sequence[str] = "*", filters: Mapping[str, Any] | None = None, **kw: Any
    ) -> Callable[[F], F]:
        """Register a handler for updates of *table* (see :meth:`add_handler`).

        Example::

            @app.on_update("todo", unwatched_fields={"updated_at"})
            def changed(event: Event) -> None: ...   # one event at a time, in a thread
        """
        return self._decorator("update", table, filters, kw)

    def on_delete(
        self, table: str | Sequence[str] = "*", filters: Mapping[str, Any] | None = None, **kw: Any
    ) -> Callable[[F], F]:
        """Register a handler for deletes from *table* (see :meth:`add_handler`)."""
        return self._decorator("delete", table, filters, kw)

    def on_truncate(
        self, table: str | Sequence[str] = "*", filters: Mapping[str, Any] | None = None, **kw: Any
    ) -> Callable[[F], F]:
        """Register a handler for TRUNCATE of *table* (one event per table truncated)."""
        return self._decorator("truncate", table, filters, kw)

    def on_event(
        self, table: str | Sequence[str] = "*", filters: Mapping[str, Any] | None = None, **kw: Any
    ) -> Callable[[F], F]:
        """Register a handler for every change of *table*: insert, update, delete, truncate.

        With ``"*"`` (or ``"app.*"``) the handler gets every matching event of
        a batch in one list, across tables, in commit order.
        """
        return self._decorator("event", table, filters, kw)

    def on_message(self, prefix: str | None = None, **kw: Any) -> Callable[[F], F]:
        """Register a handler for logical messages (``pg_logical_emit_message``).

        Args:
            prefix: the message prefix to match exactly; ``None`` for all.
            **kw: ``functions``, ``where``, ``on_error``, ``retries``, ``name``.

        Example::

            @app.on_message(prefix="outbox")
            async def publish(events: list[Event]) -> None: ...
        """

        def register(fn: F) -> F:
            self.add_handler(fn, "message", prefix=prefix, **kw)
            return fn

        return register

    def add_destination(
        self,
        destination: Destination,
        *,
        tables: str | Sequence[str] = ("*",),
        types: Collection[str] | None = None,
        on_error: str | None = None,
        retries: int | None = None,
    ) -> None:
        """Deliver the matching events of each batch to *destination*, in order.

        Args:
            destination: an object with ``name``, ``start``, ``send``, ``close``
                (:class:`Destination`).
            tables: table patterns (default every subscribed table). Logical
                messages go to destinations whose tables include ``"*"``.
            types: event types to send (``"insert"``, ..., ``"message"``);
                ``None`` for all.
            on_error: the policy for this destination, instead of the app's.
            retries: retries for this destination, instead of the app's.
        """
        for attr in ("start", "send", "close"):
            if not callable(getattr(destination, attr, None)):
                raise ConfigurationError(
                    f"a destination needs async start(), send(events) and close(); "
                    f"{destination!r} has no {attr}()"
                )
        label = str(getattr(destination, "name", type(destination).__name__))
        if types is None:
            kinds = ALL_TYPES
        else:
            kinds = frozenset(types)
            if isinstance(types, str) or not kinds <= ALL_TYPES:
                raise ConfigurationError(
                    f"destination {label}: types must be a list of {sorted(ALL_TYPES)}"
                )
        self._dispatcher.add(
            Route(
                destination,
                name=label,
                types=kinds,
                tables=self._tables(f"destination {label}", tables),
                **self._error_handling(f"destination {label}", on_error, retries),
            )
        )

    # -- dispatch --------------------------------------------------------------

    async def dispatch(self, batch: Batch) -> None:
        """Run every handler and destination concerned by *batch*; return when done.

        This is what the app does with each batch the stream yields; it is
        public for :mod:`walex.testing`. Handlers run one after another, in
        the order they were registered, then the destinations (side by side);
        each with the retries and error policy of :mod:`walex.routing`.

        Raises:
            HandlerError: a handler or destination kept failing under the
                ``"stop"`` policy.
            Abandoned: a stop was asked for while one waited to retry.
        """
        started = time.perf_counter()
        await self._before(batch)
        await self._dispatcher.dispatch(batch.events)
        if self._observers:
            self._batch_done(batch, time.perf_counter() - started)

    # -- running ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the app is streaming."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Open the slot and start handling changes in the background.

        Returns once the stream is open: changes committed after this are
        delivered (and, with a durable slot, those committed while the app
        was down). Use :meth:`stop` or :meth:`wait` afterwards.

        Before streaming, the publication's tables are looked up: a
        subscription, handler or destination whose table pattern matches
        none of them is an error (it would never fire), naming the
        ``walex setup`` command that adds the table. ``"*"`` is never one.

        Raises:
            ConfigurationError: a table pattern matches no table of the
                publication.
            WalexError: the server is not ready, the slot is in use, ... (see
                :mod:`walex.errors`); nothing keeps running.
        """
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"app {self.name!r} is already running")
        self.error = None
        self._stopping = asyncio.Event()
        self._dispatcher.stop = self._stopping
        self._forced = False
        published = await self._check_tables()
        stream = self._make_stream()
        try:
            await self._dispatcher.start()
            await stream.open()
        except BaseException:
            await stream.aclose()
            await self._dispatcher.close()
            raise
        self._stream = stream
        self._tell("track_stream", stream)
        self._log_what_runs(published)
        self._task = asyncio.get_running_loop().create_task(
            self._serve(stream), name=f"walex:{self.name}"
        )

    def _log_what_runs(self, published: set[tuple[str, str]] | None) -> None:
        """Say at start what runs: the slot, the publication's tables, each route."""
        s = self.settings
        tables = ", ".join(table_name(*t) for t in sorted(published or ()))
        logger.info(
            "%s: streaming from slot %r (%s); publication %s: %s",
            self.name,
            s.slot_name,
            "durable" if s.durable_slot else "temporary",
            ", ".join(s.publications),
            tables or "no tables yet",
        )
        if not self._routes:
            logger.warning(
                "%s: no handler and no destination: changes are read and dropped", self.name
            )
        for route in self._routes:
            types = "every change" if route.types == ALL_TYPES else ", ".join(sorted(route.types))
            logger.info(
                "%s: %s %s gets %s of %s",
                self.name,
                route.kind,
                route.name,
                types,
                route.table_label if route.types & TABLE_TYPES else "the logical messages",
            )

    async def _serve(self, stream: Stream) -> None:
        stopping = self._stopping
        assert stopping is not None
        s = self.settings
        pipeline = self._pipeline = Pipeline(
            self._dispatcher, window_events=s.window_events, window_bytes=s.window_bytes
        )
        try:
            await pipeline.run(stream.read, self._acked(stream), stop=stopping, before=self._before)
        except Abandoned:
            logger.warning(
                "%s: stopped while a handler or destination was waiting to retry; that "
                "transaction is not confirmed and comes again on restart",
                self.name,
            )
            await stream.__aexit__(Abandoned, None, None)
        except asyncio.CancelledError:
            if pipeline.busy:
                self._forced = True
                logger.warning(
                    "%s: forced stop; the transactions being handled are not confirmed",
                    self.name,
                )
            await asyncio.shield(stream.__aexit__(asyncio.CancelledError, None, None))
            raise
        except BaseException as exc:
            self.error = exc
            if isinstance(exc, WalexError):
                # wait() and stop() raise it too: `walex` prints it, once.
                logger.error("%s: stopped: %s", self.name, exc, extra={"walex_fatal": True})
            else:
                logger.error("%s: stopped by an unexpected error", self.name, exc_info=exc)
            await stream.__aexit__(type(exc), exc, exc.__traceback__)
        else:
            # A clean end: every batch read was delivered and acknowledged.
            await stream.__aexit__(None, None, None)
        finally:
            self._pipeline = None
            await self._dispatcher.close()
            self._tell("untrack_stream", stream)
            self._stream = None
            logger.info("%s: stopped", self.name)

    async def _before(self, batch: Batch) -> None:
        """What the app does with a batch before its routes: WalEx's message_middleware."""
        if self._middleware is None:
            return
        try:
            result = self._middleware(batch)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            raise HandlerError(
                f"message_middleware failed on the batch of transaction {batch.xid} "
                f"(commit {batch.commit_lsn}): {type(exc).__name__}: {exc}; the app stops "
                "and the transaction is not confirmed"
            ) from exc

    def _acked(self, stream: Stream) -> Callable[[Batch, float], None]:
        """Acknowledge a batch every route is done with, and tell the observers."""

        def ack(batch: Batch, seconds: float) -> None:
            stream.ack(batch)
            self._batch_done(batch, seconds)

        return ack

    def _batch_done(self, batch: Batch, seconds: float) -> None:
        for obs in self._observers:
            method = getattr(obs, "on_batch", None)
            if method is not None:
                try:
                    method(batch, seconds)
                except Exception:
                    logger.exception("observer %r failed in on_batch", obs)

    def _tell(self, method: str, stream: Stream) -> None:
        for obs in self._observers:
            hook = getattr(obs, method, None)
            if hook is not None:
                try:
                    hook(stream)
                except Exception:
                    logger.exception("observer %r failed in %s", obs, method)

    @property
    def forced(self) -> bool:
        """Whether the last stop was forced with a transaction left unconfirmed."""
        return self._forced

    @property
    def stream(self) -> Stream | None:
        """The engine's stream while the app runs (positions, lag), else ``None``."""
        return self._stream

    def request_stop(self) -> None:
        """Ask the app to stop gracefully, without waiting (safe from a signal handler).

        Running handlers finish; what they handled is confirmed.
        """
        if self._stopping is None or self._task is None:
            return
        self._stopping.set()
        if self._pipeline is not None:
            self._pipeline.interrupt()  # only a wait for the stream: handlers finish

    def force_stop(self) -> None:
        """Stop now: cancel running handlers; the transaction in hand is not confirmed."""
        if self._task is not None and not self._task.done():
            if self._stopping is not None:
                self._stopping.set()
            self._task.cancel()

    async def stop(self) -> None:
        """Stop gracefully and wait: running handlers finish, their work is confirmed.

        After ``stop_timeout`` seconds (if set), running handlers are cancelled
        and their transaction is not confirmed.

        Raises:
            WalexError: the error that stopped the app before, if one did.
        """
        task = self._task
        if task is None:
            return
        self.request_stop()
        timeout = self.settings.stop_timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
        except TimeoutError:
            logger.warning("%s: handlers still running after %ss; cancelling", self.name, timeout)
            self.force_stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._raise_error()

    async def wait(self) -> None:
        """Wait until the app stops; raise the error that stopped it, if any."""
        task = self._task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    async def __aenter__(self) -> WalEx:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.stop()
            return
        try:
            await self.stop()
        except WalexError as app_error:
            # Do not hide the exception of the `async with` body.
            logger.error("%s: also stopped with an error: %s", self.name, app_error)

    def run(self) -> None:
        """Run until SIGINT or SIGTERM; then stop gracefully and return.

        Raises:
            WalexError: what stopped the app, if it did not stop by a signal.
        """
        run(self)


_TABLES_SQL = """
SELECT n.nspname::text, c.relname::text
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
"""


def _setup_command(dsn: str, publication: str, tables: Sequence[str]) -> str:
    """The ``walex setup`` command line that adds *tables* to *publication*."""
    options = [word for table in tables for word in ("--table", table)]
    return shlex.join(["walex", "setup", dsn, "--publication", publication, *options])

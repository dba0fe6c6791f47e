"""Routing: which handler or destination gets which events, and what a failure costs.

This module owns the dispatch step for handlers and destinations alike: the
one table-pattern grammar (:mod:`walex.names`), :class:`Route` (the filter,
the target and how it is called, in one object), :class:`RetryPolicy`, the
error policies with :class:`DeadLetter` and its sinks, and
:class:`Dispatcher`, which runs a batch through its routes. It knows nothing
of streams, apps, settings files or particular brokers: it must not import
``walex.app``, ``walex.stream``, ``walex.destinations``, ``walex.commands``
or ``walex.config``.

Example::

    dispatcher = Dispatcher(
        [
            Route(welcome, types={"insert"}, tables="user_account"),
            Route(JsonLines("out.jsonl"), tables="order_*", on_error="skip"),
        ]
    )
    async with dispatcher:
        await dispatcher.dispatch(batch.events)   # returns once every route is done
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import random
import time
import typing
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeAlias, runtime_checkable

from .errors import Abandoned, ConfigurationError, DestinationError, HandlerError
from .events import Batch, Event
from .filters import unwatched_fields as _keep_update
from .filters import watched_record as _keep_record
from .names import TablePattern, parse_pattern, quote_name
from .wire import to_dict

__all__ = [
    "ALL_TYPES",
    "POLICIES",
    "TABLE_TYPES",
    "Abandoned",
    "DeadLetter",
    "DeadLetterSink",
    "Destination",
    "Dispatcher",
    "ErrorPolicy",
    "Pipeline",
    "RetryPolicy",
    "Route",
    "TablePattern",
    "Unmatched",
    "parse_pattern",
    "send_with_retry",
    "unmatched_patterns",
]

logger = logging.getLogger("walex.routing")

ErrorPolicy = Literal["stop", "skip", "dead_letter"]
"""What happens when the retries are spent: raise, log and go on, or write a dead letter."""

POLICIES: tuple[ErrorPolicy, ...] = ("stop", "skip", "dead_letter")

TABLE_TYPES = frozenset({"insert", "update", "delete", "truncate"})
"""The event types of table changes."""

ALL_TYPES = frozenset({*TABLE_TYPES, "message"})
"""Every event type: the table changes and logical messages."""


# -- what routes deliver to -------------------------------------------------


@runtime_checkable
class Destination(Protocol):
    """What walex delivers events to.

    Attributes:
        name: a short name for logs and errors (``"nats"``, ``"audit-webhook"``).
    """

    name: str

    async def start(self) -> None:
        """Connect. Called once before the first :meth:`send`."""

    async def send(self, events: Sequence[Event]) -> None:
        """Deliver *events*, in order; return once the receiver durably has them.

        Raises:
            DestinationError: with ``retryable`` telling whether to try again.
                Any other exception counts as retryable.
        """

    async def close(self) -> None:
        """Disconnect. Called once, also after a failed :meth:`start`."""


Handler: TypeAlias = Callable[..., Any]
"""A function (sync or async) taking ``list[Event]``, or one ``Event`` when its
first parameter is annotated ``Event``."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Events that a handler (or destination) could not handle.

    Attributes:
        app: the app's name.
        handler: the handler's (or destination's) name.
        events: the events it failed on, as handed to it.
        error: the last exception.
        attempts: how many times it was tried.
        failed_at: when it gave up (UTC).
    """

    app: str
    handler: str
    events: list[Event]
    error: BaseException
    attempts: int
    failed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to a dead-letter file (one line each)."""
        return {
            "app": self.app,
            "handler": self.handler,
            "error": {"type": type(self.error).__name__, "message": str(self.error)},
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat(),
            "events": [to_dict(e) for e in self.events],
        }


DeadLetterSink: TypeAlias = "Destination | Callable[[DeadLetter], Any] | str | os.PathLike[str]"
"""Where ``on_error="dead_letter"`` puts what failed: a :class:`Destination`
(it gets the events, with retries), a callable taking a :class:`DeadLetter`
(sync or async), or the path of a JSON-lines file (one :meth:`DeadLetter.to_dict`
line per failure, fsynced before the events count as handled)."""


# -- retries -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how long apart, a failed call is tried again.

    The same policy serves handlers, functions and destinations. The delay
    doubles from *initial* up to *maximum*, and each wait is stretched by up
    to *jitter* (10 %) at random, so that many walex processes do not knock
    at the same moment; a wait is never shorter than the doubling says. A
    receiver's ``Retry-After`` replaces the delay (up to *max_retry_after*).

    Attributes:
        retries: tries after the first; ``None`` tries forever.
        initial: the first delay, in seconds.
        maximum: the longest delay before jitter.
        multiplier: the growth of the delay from one try to the next.
        jitter: each delay is up to this fraction longer.
        max_retry_after: the longest ``Retry-After`` obeyed.
    """

    retries: int | None = 3
    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    max_retry_after: float = 600.0

    def __post_init__(self) -> None:
        retries = self.retries
        if retries is not None and (
            not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
        ):
            raise ConfigurationError("retries must be a whole number of at least 0, or None")
        if not (0 <= self.initial <= self.maximum) or self.multiplier < 1:
            raise ConfigurationError(
                "retry delays need 0 <= initial <= maximum and multiplier >= 1"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("jitter must be a fraction from 0 to 1")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before try number *attempt* + 1 (*attempt* counts from 1)."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after)
        base = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return base * (1 + random.uniform(0, self.jitter)) if self.jitter else base

    def gives_up(self, attempt: int) -> bool:
        """Whether *attempt* failed tries are all there may be."""
        return self.retries is not None and attempt > self.retries

    def with_retries(self, retries: int | None) -> RetryPolicy:
        """This policy with another number of retries."""
        return self if retries == self.retries else replace(self, retries=retries)


def _retry_hint(exc: BaseException) -> tuple[bool, float | None]:
    """Whether *exc* may succeed on another try, and after how long it asks."""
    if isinstance(exc, DestinationError):
        return exc.retryable, exc.retry_after
    return True, None


def _as_error(exc: BaseException, destination: Destination) -> DestinationError:
    if isinstance(exc, DestinationError):
        return exc
    # A custom destination's own exception: unknown, so worth another try.
    error = DestinationError(
        f"{type(exc).__name__}: {exc}", destination=destination.name, retryable=True
    )
    error.__cause__ = exc
    return error


Pause = Callable[[float], Awaitable[None]]
GiveUp = Callable[[Sequence[Event], DestinationError, int], Awaitable[None]]
Attempt = Callable[[Sequence[Event], float, BaseException | None], None]


async def _send_loop(
    destination: Destination,
    events: Sequence[Event],
    policy: RetryPolicy,
    *,
    give_up: GiveUp,
    pause: Pause,
    attempted: Attempt | None = None,
    who: str = "",
) -> int:
    """Send *events*, resending what was not accepted; return how many were accepted."""
    pending: Sequence[Event] = events
    accepted = 0
    attempt = 0
    while True:
        attempt += 1
        started = time.perf_counter()
        try:
            await destination.send(pending)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if attempted is not None:
                attempted(pending, time.perf_counter() - started, exc)
            error = _as_error(exc, destination)
            if error.failed:
                # Those before the failed ones were accepted: resend only the rest.
                accepted += len(pending) - len(error.failed)
                pending = error.failed
            if error.retryable and not policy.gives_up(attempt):
                delay = policy.delay(attempt, error.retry_after)
                logger.warning(
                    "%s%s: %d event(s) not delivered (attempt %d of %s), again in %.2fs: %s",
                    who,
                    destination.name,
                    len(pending),
                    attempt,
                    _total(policy),
                    delay,
                    error,
                )
                await pause(delay)
                continue
            rejected = error.rejected
            if not error.retryable and rejected and len(rejected) < len(pending):
                # Only these were refused: the policy takes them, the rest go on.
                await give_up(rejected, error, attempt)
                pending = pending[len(rejected) :]
                attempt = 0
                continue
            await give_up(pending, error, attempt)
            return accepted
        else:
            if attempted is not None:
                attempted(pending, time.perf_counter() - started, None)
            return accepted + len(pending)


async def send_with_retry(
    destination: Destination,
    events: Sequence[Event],
    policy: RetryPolicy,
    *,
    on_give_up: Callable[[Sequence[Event], DestinationError], Awaitable[None]],
    stop: asyncio.Event | None = None,
) -> int:
    """Send *events* to *destination*, retrying as *policy* says.

    What was not accepted is sent again (only the ``failed`` tail, when the
    destination says which), after the policy's delay or the receiver's
    ``Retry-After``. Events that cannot be delivered — the retries are
    spent, or the destination refused them for good (``retryable=False``) —
    are handed to *on_give_up* with the last error; it decides: raise to
    stop, return to go on (skip, or after writing a dead letter). Events
    refused for good (``rejected``) go to *on_give_up* alone and the rest
    are still sent.

    Args:
        destination: where the events go.
        events: the events, in order.
        policy: the retries and their delays.
        on_give_up: takes what could not be delivered, and the last error.
        stop: once set, a wait for the next try ends at once with
            :class:`Abandoned` (nothing more is sent).

    Returns:
        How many events the destination accepted.

    Raises:
        Abandoned: *stop* was set while waiting to try again.
    """

    async def give_up(failed: Sequence[Event], error: DestinationError, attempts: int) -> None:
        await on_give_up(failed, error)

    return await _send_loop(destination, events, policy, give_up=give_up, pause=_pauser(stop))


def _pauser(stop: asyncio.Event | None) -> Pause:
    async def pause(delay: float) -> None:
        await _pause(stop, delay)

    return pause


async def _pause(stop: asyncio.Event | None, delay: float) -> None:
    """Sleep *delay* seconds, or raise :class:`Abandoned` as soon as *stop* is set."""
    if stop is None:
        await asyncio.sleep(delay)
        return
    if not stop.is_set():
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            return
    raise Abandoned("stopped while waiting to retry; the batch is not handled")


def _total(policy: RetryPolicy) -> str:
    return "unlimited" if policy.retries is None else str(policy.retries + 1)


# -- routes ------------------------------------------------------------------------


def _is_destination(target: object) -> bool:
    # What the Destination protocol asks for, without insisting on `name`
    # (a route names a nameless one after its class).
    return all(callable(getattr(target, m, None)) for m in ("start", "send", "close"))


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _takes_one_event(fn: Callable[..., Any]) -> bool:
    """Whether the handler's first parameter is annotated ``Event`` (not a list)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params:
        raise ConfigurationError(f"handler {name_of(fn)} must take one argument: the events")
    annotation = params[0].annotation
    if annotation is Event:
        return True
    if isinstance(annotation, str):
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            return annotation.rsplit(".", 1)[-1] == "Event"
        return hints.get(params[0].name) is Event
    return False


def name_of(fn: Any) -> str:
    """``module:qualname`` of a function, the name a handler gets by default."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{qualname}" if module else str(qualname)


async def _call(fn: Callable[..., Any], is_async: bool, arg: Any) -> None:
    if is_async:
        await fn(arg)
        return
    # Sync code runs in a worker thread so that it cannot stall the stream.
    result = await asyncio.to_thread(fn, arg)
    if inspect.isawaitable(result):
        await result


_POLICY: Any = object()  # retries not given: the policy's


def _patterns(label: str, tables: Any) -> tuple[TablePattern, ...]:
    items = [tables] if isinstance(tables, (str, TablePattern)) else list(tables)
    out = []
    for item in items:
        try:
            out.append(parse_pattern(item))
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{label}: table: {exc}") from None
    return tuple(out)


class Route:
    """One handler or destination: which events it receives, and how it is called.

    A route selects, from each batch, the events whose type is in *types*,
    whose table matches one of *tables* (logical messages, which have no
    table, when *tables* is ``"*"`` or empty, and *prefix* matches), and
    that pass the filters; it shapes their records (*columns* /
    *exclude_columns*) and hands them to its target, then runs the
    *functions* pipeline on each. A failed call is retried as *policy*
    says; then *on_error* decides.

    Args:
        target: a handler (sync, run in a worker thread, or async; taking
            ``list[Event]``, or one ``Event`` if its first parameter is
            annotated so) or a :class:`Destination`.
        name: for logs, metrics and dead letters (default: the function's
            ``module:qualname``, or the destination's ``name``).
        tables: table patterns (:mod:`walex.names`): ``"todo"`` (in
            ``public``), ``"app.todo"``, ``"app.*"``, ``"order_*"``, a
            quoted name, or ``"*"`` for every table and the logical messages.
        types: the event types it gets (``"insert"``, ``"update"``,
            ``"delete"``, ``"truncate"``, ``"message"``); ``None``: all.
        prefix: for logical messages, the prefix to match exactly.
        unwatched_fields: drop updates that change only these columns.
        unwatched_records: drop events whose record has all these values.
        where: keep only the events for which this returns true.
        columns: hand over only these columns of each record.
        exclude_columns: hand over every column but these.
        functions: run on each event after the target, in order.
        on_error: ``"stop"`` (raise; the batch is not confirmed),
            ``"skip"`` (log and go on) or ``"dead_letter"`` (hand the events
            to *dead_letter*, then go on).
        retries: tries after the first (``None``: forever); when given,
            it overrides *policy*'s.
        policy: the retries and their backoff (default :class:`RetryPolicy`).
        dead_letter: the sink for ``on_error="dead_letter"``.

    Raises:
        ConfigurationError: a wrong argument.
    """

    __slots__ = (
        "_destination",
        "_everything",
        "_messages",
        "_table_cache",
        "columns",
        "dead_letter",
        "dead_lettered",
        "delivered",
        "exclude_columns",
        "functions",
        "is_async",
        "label",
        "name",
        "on_error",
        "per_event",
        "policy",
        "prefix",
        "skipped",
        "table_label",
        "tables",
        "target",
        "types",
        "unwatched_fields",
        "unwatched_records",
        "where",
    )

    def __init__(
        self,
        target: Destination | Handler,
        *,
        name: str | None = None,
        tables: str | TablePattern | Sequence[str | TablePattern] = ("*",),
        types: str | Collection[str] | None = None,
        prefix: str | None = None,
        unwatched_fields: Collection[str] | None = None,
        unwatched_records: Mapping[str, Any] | None = None,
        where: Callable[[Event], bool] | None = None,
        columns: Collection[str] | None = None,
        exclude_columns: Collection[str] | None = None,
        functions: Sequence[Callable[[Event], Any]] = (),
        on_error: ErrorPolicy = "stop",
        retries: int | None = _POLICY,
        policy: RetryPolicy | None = None,
        dead_letter: DeadLetterSink | None = None,
    ) -> None:
        is_destination = _is_destination(target)
        if not is_destination and not callable(target):
            raise ConfigurationError(
                f"a route needs a handler (a callable) or a destination, not {target!r}"
            )
        self.target = target
        if name is None:
            name = (
                str(getattr(target, "name", type(target).__name__))
                if is_destination
                else name_of(target)
            )
        self.name = name
        self._destination = is_destination
        if types is None:
            self.types = ALL_TYPES
        else:
            kinds = [types] if isinstance(types, str) else list(types)
            unknown = set(kinds) - ALL_TYPES
            if unknown or not kinds:
                raise ConfigurationError(
                    f"{name}: unknown event type(s) {sorted(unknown)}; use {sorted(ALL_TYPES)}"
                )
            self.types = frozenset(kinds)
        self.tables = _patterns(name, tables)
        any_table = any(t.schema is None and t.table is None for t in self.tables)
        if not self.tables and self.types & TABLE_TYPES:
            raise ConfigurationError(f"{name}: tables must name at least one table pattern")
        self._messages = any_table or not self.tables
        self.prefix = prefix
        self.unwatched_fields = frozenset(unwatched_fields) if unwatched_fields else None
        self.unwatched_records = dict(unwatched_records) if unwatched_records else None
        self.where = where
        self.columns = tuple(columns) if columns is not None else None
        self.exclude_columns = frozenset(exclude_columns) if exclude_columns else None
        if self.columns is not None and self.exclude_columns is not None:
            raise ConfigurationError(f"{name}: give columns or exclude_columns, not both")
        self.functions = tuple(functions)
        if on_error not in POLICIES:
            raise ConfigurationError(
                f"{name}: on_error must be 'stop', 'skip' or 'dead_letter', not {on_error!r}"
            )
        if on_error == "dead_letter" and dead_letter is None:
            raise ConfigurationError(
                f"{name}: on_error='dead_letter' needs a dead_letter destination, "
                "callable or JSON-lines file"
            )
        self.on_error: ErrorPolicy = on_error
        policy = policy if policy is not None else RetryPolicy()
        self.policy = policy if retries is _POLICY else policy.with_retries(retries)
        self.dead_letter = dead_letter
        fn = typing.cast(Handler, target)
        self.per_event = not is_destination and _takes_one_event(fn)
        self.is_async = not is_destination and _is_async(fn)
        self.label = (
            "message"
            if self.types == {"message"}
            else (next(iter(self.types)) if len(self.types) == 1 else "event")
        )
        self.table_label = ",".join(str(t) for t in self.tables) if self.tables else "*"
        self._everything = (
            any_table
            and self.types == ALL_TYPES
            and prefix is None
            and where is None
            and self.unwatched_fields is None
            and self.unwatched_records is None
            and self.columns is None
            and self.exclude_columns is None
        )
        self._table_cache: dict[tuple[str, str], bool] = {}
        self.delivered = self.skipped = self.dead_lettered = 0

    def __repr__(self) -> str:
        return f"Route({self.name!r}, tables={self.table_label!r}, types={sorted(self.types)})"

    @property
    def destination(self) -> Destination | None:
        """The target, if it is a destination."""
        return typing.cast(Destination, self.target) if self._destination else None

    @property
    def handler(self) -> Handler | None:
        """The target, if it is a handler."""
        return None if self._destination else typing.cast(Handler, self.target)

    @property
    def kind(self) -> Literal["handler", "destination"]:
        """``"handler"`` or ``"destination"``."""
        return "destination" if self._destination else "handler"

    @property
    def retries(self) -> int | None:
        """The retries after the first try (``None``: forever)."""
        return self.policy.retries

    def wants_table(self, schema: str, table: str) -> bool:
        """Whether the table ``schema.table`` matches one of the route's patterns."""
        key = (schema, table)
        hit = self._table_cache.get(key)
        if hit is None:
            hit = self._table_cache[key] = any(t.matches(schema, table) for t in self.tables)
        return hit

    def matches(self, event: Event) -> bool:
        """Whether *event* is of a type and table (or prefix) this route takes.

        The filters (``where``, ``unwatched_*``) are not asked.
        """
        if event.type not in self.types:
            return False
        source = event.source
        if source is None:
            return self._messages and (self.prefix is None or event.prefix == self.prefix)
        return self.wants_table(source.schema, source.table)

    def select(self, events: Iterable[Event]) -> list[Event]:
        """The events this route gets, filtered and shaped, in order.

        Raises:
            Exception: what a ``where`` predicate raised.
        """
        if self._everything:
            return list(events)
        out: list[Event] = []
        types = self.types
        for e in events:
            if e.type not in types:
                continue
            src = e.source
            if src is None:  # a logical message
                if not self._messages or (self.prefix is not None and e.prefix != self.prefix):
                    continue
            elif not self.wants_table(src.schema, src.table):
                continue
            if self.unwatched_fields is not None and not _keep_update(e, self.unwatched_fields):
                continue
            if self.unwatched_records is not None and not _keep_record(e, self.unwatched_records):
                continue
            if self.where is not None and not self.where(e):
                continue
            out.append(self._shape(e) if src is not None else e)
        return out

    def _shape(self, e: Event) -> Event:
        if self.columns is None and self.exclude_columns is None:
            return e
        return e._replace(
            new_record=self._keep(e.new_record),
            old_record=self._keep(e.old_record),
            unchanged_toast=frozenset(self._keep(dict.fromkeys(e.unchanged_toast)) or ()),
        )

    def _keep(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        if record is None:
            return None
        if self.columns is not None:
            record = {k: record[k] for k in self.columns if k in record}
        if self.exclude_columns is not None:
            record = {k: v for k, v in record.items() if k not in self.exclude_columns}
        return record


# -- patterns against the tables that exist -------------------------------------


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A table pattern that matches none of the tables it could get.

    Attributes:
        owner: whose pattern: ``"subscriptions"``, ``"handler shop:welcome"``,
            ``"destination redis"``.
        pattern: the pattern.
        left_out: tables of the publication that it matches but that the
            subscriptions leave out (empty: it matches no published table).
    """

    owner: str
    pattern: TablePattern
    left_out: tuple[tuple[str, str], ...] = ()


def unmatched_patterns(
    routes: Iterable[Route],
    subscriptions: Sequence[TablePattern],
    published: Collection[tuple[str, str]],
) -> list[Unmatched]:
    """The patterns that can never match: each would route nothing, silently.

    A subscription must match a table of the publication; a route's pattern
    must match a table of the publication that the subscriptions keep.
    ``"*"`` always matches (a publication may gain tables later).

    Args:
        routes: the routes to check.
        subscriptions: the app's subscriptions.
        published: ``(schema, table)`` of every table of the publications.
    """
    out: list[Unmatched] = []

    def any_table(p: TablePattern) -> bool:
        return p.schema is None and p.table is None

    for sub in subscriptions:
        if not any_table(sub) and not any(sub.matches(s, t) for s, t in published):
            out.append(Unmatched("subscriptions", sub))
    kept = [(s, t) for s, t in published if any(sub.matches(s, t) for sub in subscriptions)]
    for route in routes:
        if not route.types & TABLE_TYPES:
            continue
        for pattern in route.tables:
            if any_table(pattern) or any(pattern.matches(s, t) for s, t in kept):
                continue
            left_out = tuple(sorted((s, t) for s, t in published if pattern.matches(s, t)))
            out.append(Unmatched(f"{route.kind} {route.name}", pattern, left_out))
    return out


def table_name(schema: str, table: str) -> str:
    """``schema.table`` in the grammar of :mod:`walex.names` (quoted where needed)."""
    return f"{quote_name(schema)}.{quote_name(table)}"


# -- the engine --------------------------------------------------------------------


class Dispatcher:
    """Runs each batch through its routes: retries, error policy, dead letters.

    :meth:`dispatch` runs the handler routes one after another, in the order
    they were added, then the destination routes (concurrently: each
    destination gets its events in order, and several destinations do not
    wait for one another). It returns once every route has handled its
    events, or skipped them, or written them to a dead letter. A route whose
    ``"stop"`` policy gives up makes it raise: the batch must then not be
    confirmed.

    Use it as ``async with`` (or :meth:`start` / :meth:`close`) to start and
    close the destinations.

    Args:
        routes: the routes, in order.
        name: names the owner (the app) in logs and dead letters.
        subscriptions: if given, only events of these tables (and logical
            messages) reach any route.
        observers: objects with ``on_handler(name, table, type, seconds,
            error)``, told about every attempt of a handler, function or
            destination.
        stop: once set, a wait to retry ends at once with :class:`Abandoned`
            (the batch is not handled, and must not be confirmed).
        stop_message: when set, a ``"stop"`` give-up raises
            :class:`~walex.errors.HandlerError` whose message ends with it
            (the app's wording); when ``None``, the error itself is raised
            (a destination's as :class:`~walex.errors.DestinationError`).
    """

    def __init__(
        self,
        routes: Iterable[Route] = (),
        *,
        name: str = "",
        subscriptions: Sequence[TablePattern] | None = None,
        observers: Iterable[object] = (),
        stop: asyncio.Event | None = None,
        stop_message: str | None = None,
    ) -> None:
        self.routes: list[Route] = []
        self.name = name
        self.subscriptions = tuple(subscriptions) if subscriptions is not None else None
        self._all_subscribed = self.subscriptions is None or any(
            s.schema is None and s.table is None for s in self.subscriptions
        )
        self._sub_cache: dict[tuple[str, str], bool] = {}
        self.observers = list(observers)
        self.stop = stop
        self.stop_message = stop_message
        self._started: list[Destination] = []
        for route in routes:
            self.add(route)

    def add(self, route: Route) -> Route:
        """Add *route* after the others; returns it."""
        self.routes.append(route)
        return route

    @property
    def destinations(self) -> list[Destination]:
        """Every destination of the routes (dead-letter ones too), once each."""
        out: list[Destination] = []
        for route in self.routes:
            for dest in self._route_destinations(route):
                if not any(dest is d for d in out):
                    out.append(dest)
        return out

    @staticmethod
    def _route_destinations(route: Route) -> list[Destination]:
        return [
            typing.cast(Destination, d)
            for d in (route.destination, route.dead_letter)
            if d is not None and _is_destination(d)
        ]

    def subscribed(self, schema: str, table: str) -> bool:
        """Whether the subscriptions take the table ``schema.table``."""
        if self._all_subscribed:
            return True
        key = (schema, table)
        hit = self._sub_cache.get(key)
        if hit is None:
            assert self.subscriptions is not None
            hit = self._sub_cache[key] = any(s.matches(schema, table) for s in self.subscriptions)
        return hit

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()  # those started before the one that failed
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every destination once, retrying as its route's policy says.

        Raises:
            DestinationError: a destination could not be started.
            Abandoned: the stop signal ended a wait to retry.
        """
        for route in self.routes:
            for dest in self._route_destinations(route):
                if any(dest is s for s in self._started):
                    continue
                self._started.append(dest)
                await self._retrying("start", dest, route.policy, dest.start)

    async def close(self) -> None:
        """Close every destination that was started, whatever happens."""
        started, self._started = self._started, []
        for dest in reversed(started):
            try:
                await dest.close()
            except Exception:
                logger.exception("%sclosing destination %s failed", self._who, dest.name)

    @property
    def _who(self) -> str:
        return f"{self.name}: " if self.name else ""

    # -- dispatch --------------------------------------------------------------

    async def dispatch(self, events: Sequence[Event]) -> None:
        """Run every route that wants some of *events*; return when all are done.

        Raises:
            HandlerError: a route's ``"stop"`` policy gave up (with
                *stop_message*; else the route's own error is raised).
            Abandoned: the stop signal ended a wait to retry.
        """
        jobs = await self.run_handlers(events)
        if len(jobs) == 1:
            await self._run(*jobs[0])
        elif jobs:
            await self._together(jobs)

    async def run_handlers(self, events: Sequence[Event]) -> list[tuple[Route, list[Event]]]:
        """Run the handler routes that want some of *events*, in order; return
        what each destination route wants, for the caller to send.

        Raises:
            HandlerError, Abandoned: as :meth:`dispatch`.
        """
        if not self._all_subscribed:
            events = [
                e
                for e in events
                if e.source is None or self.subscribed(e.source.schema, e.source.table)
            ]
        if not events:
            return []
        jobs: list[tuple[Route, list[Event]]] = []
        for route in self.routes:
            try:
                selected = route.select(events)
            except Exception:
                # A `where` predicate raised: the events it raised on go to the
                # route's error policy, each alone; the others go on.
                selected = []
                for event in events:
                    try:
                        selected += route.select((event,))
                    except Exception as exc:
                        await self._give_up(route, f"{route.name} (where)", [event], exc, 1)
            if not selected:
                continue
            if route.destination is None:
                await self._run(route, selected)
            else:
                jobs.append((route, selected))
        return jobs

    async def deliver(self, route: Route, events: list[Event]) -> None:
        """Send *events* to *route*'s destination, with its retries and error policy,
        then run its functions."""
        await self._run(route, events)

    async def _together(self, jobs: list[tuple[Route, list[Event]]]) -> None:
        tasks = [asyncio.ensure_future(self._run(route, events)) for route, events in jobs]
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            raise
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in tasks:
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error

    async def _run(self, route: Route, events: list[Event]) -> None:
        dest = route.destination
        if dest is not None:
            await self._send(route, dest, events)
            await self._pipeline(route, events)
            return
        handler = typing.cast(Handler, route.target)
        if route.per_event:
            for event in events:
                await self._attempt(route, route.name, handler, route.is_async, event, [event])
                await self._pipeline(route, [event])
        else:
            await self._attempt(route, route.name, handler, route.is_async, events, events)
            await self._pipeline(route, events)

    async def _pipeline(self, route: Route, events: list[Event]) -> None:
        for fn in route.functions:
            label = f"{route.name} → {name_of(fn)}"
            is_async = _is_async(fn)
            for event in events:
                await self._attempt(route, label, fn, is_async, event, [event])

    async def _attempt(
        self,
        route: Route,
        label: str,
        fn: Callable[..., Any],
        is_async: bool,
        arg: Any,
        events: list[Event],
    ) -> None:
        policy = route.policy
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await _call(fn, is_async, arg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._observe(label, route, events, time.perf_counter() - started, exc)
                retryable, retry_after = _retry_hint(exc)
                if not retryable or policy.gives_up(attempt):
                    await self._give_up(route, label, events, exc, attempt)
                    return
                delay = policy.delay(attempt, retry_after)
                logger.warning(
                    "%s%s failed on %s (attempt %d of %s: %s: %s); retrying in %.2fs",
                    self._who,
                    label,
                    _describe(events),
                    attempt,
                    _total(policy),
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await _pause(self.stop, delay)
            else:
                if self.observers:
                    self._observe(label, route, events, time.perf_counter() - started, None)
                if fn is route.target:
                    route.delivered += len(events)
                return

    async def _send(self, route: Route, dest: Destination, events: list[Event]) -> None:
        # Destinations say more than "it failed": which events were accepted,
        # whether to retry at all (a webhook's 4xx), and when (Retry-After).
        async def give_up(failed: Sequence[Event], error: DestinationError, attempts: int) -> None:
            await self._give_up(route, route.name, list(failed), error, attempts)

        def attempted(sent: Sequence[Event], seconds: float, error: BaseException | None) -> None:
            if self.observers:
                self._observe(route.name, route, sent, seconds, error)

        route.delivered += await _send_loop(
            dest,
            events,
            route.policy,
            give_up=give_up,
            pause=_pauser(self.stop),
            attempted=attempted,
            who=self._who,
        )

    async def _retrying(
        self,
        what: str,
        destination: Destination,
        policy: RetryPolicy,
        call: Callable[[], Awaitable[None]],
    ) -> None:
        """Run ``call()`` until it succeeds or the policy gives up (then raise)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await call()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = _as_error(exc, destination)
                if not error.retryable or policy.gives_up(attempt):
                    if error is exc:
                        raise
                    raise error from exc
                delay = policy.delay(attempt, error.retry_after)
                logger.warning(
                    "%s%s %s failed (attempt %d of %s), again in %.2fs: %s",
                    self._who,
                    destination.name,
                    what,
                    attempt,
                    _total(policy),
                    delay,
                    error,
                )
                await _pause(self.stop, delay)

    def _observe(
        self,
        label: str,
        route: Route,
        events: Sequence[Event],
        seconds: float,
        error: BaseException | None,
    ) -> None:
        tables = {e.source.name for e in events if e.source is not None}
        table = tables.pop() if len(tables) == 1 else route.table_label
        for obs in self.observers:
            method = getattr(obs, "on_handler", None)
            if method is not None:
                try:
                    method(label, table, route.label, seconds, error)
                except Exception:
                    logger.exception("observer %r failed in on_handler", obs)

    # -- error policy ----------------------------------------------------------------

    async def _give_up(
        self, route: Route, label: str, events: list[Event], exc: Exception, attempts: int
    ) -> None:
        what = f"{label} failed on {_describe(events)} after {attempts} attempt(s)"
        policy = route.on_error
        if policy == "skip":
            logger.error("%s%s; skipped (on_error='skip')", self._who, what, exc_info=exc)
            route.skipped += len(events)
            return
        if policy == "dead_letter":
            try:
                await self._write_dead_letter(route, label, events, exc, attempts)
            except Abandoned:
                raise
            except Exception as dl_exc:
                if self.stop_message is None:
                    raise
                raise HandlerError(
                    f"{what}: {type(exc).__name__}: {exc}; and the dead letter could not be "
                    f"written ({type(dl_exc).__name__}: {dl_exc}); nothing after it is confirmed"
                ) from dl_exc
            logger.error("%s%s; sent to the dead letters", self._who, what, exc_info=exc)
            route.dead_lettered += len(events)
            return
        if self.stop_message is None:
            if route.destination is not None:
                raise _as_error(exc, route.destination)
            raise exc
        raise HandlerError(f"{what}: {type(exc).__name__}: {exc}. {self.stop_message}") from exc

    async def _write_dead_letter(
        self, route: Route, label: str, events: list[Event], exc: Exception, attempts: int
    ) -> None:
        sink = route.dead_letter
        if sink is None:  # pragma: no cover - checked by Route
            raise ConfigurationError(f"{route.name}: no dead_letter sink")
        if _is_destination(sink):
            dest = typing.cast(Destination, sink)

            async def to_dead_letter() -> None:
                await dest.send(events)

            await self._retrying("dead letter", dest, route.policy, to_dead_letter)
            return
        letter = DeadLetter(self.name, label, list(events), exc, attempts)
        if isinstance(sink, (str, os.PathLike)):
            line = json.dumps(letter.to_dict(), ensure_ascii=False, separators=(",", ":"))
            await asyncio.to_thread(_append_line, Path(sink), line)
            return
        write = typing.cast(Callable[[DeadLetter], Any], sink)
        await _call(write, _is_async(write), letter)  # a sync sink runs in a worker thread


class _Item:
    """A batch in the pipeline: the destination routes still sending it."""

    __slots__ = ("batch", "events", "read_at", "remaining")

    def __init__(self, batch: Batch, events: int, remaining: int, read_at: float) -> None:
        self.batch = batch
        self.events = events
        self.remaining = remaining
        self.read_at = read_at


class _Window:
    """How many events and bytes are in flight, and the wait for room."""

    def __init__(self, events: int, size: int) -> None:
        self.max_events = events
        self.max_size = size
        self.events = 0
        self.size = 0
        self.items = 0
        self._room = asyncio.Event()
        self._room.set()

    async def take(self, events: int, size: int) -> None:
        # A batch bigger than the window goes alone, once nothing else is in flight.
        while self.items and (
            self.events + events > self.max_events or self.size + size > self.max_size
        ):
            self._room.clear()
            await self._room.wait()
        self.events += events
        self.size += size
        self.items += 1

    def give(self, events: int, size: int) -> None:
        self.events -= events
        self.size -= size
        self.items -= 1
        self._room.set()

    async def wait_empty(self, senders: Sequence[asyncio.Task[None]]) -> None:
        """Wait for the next batch to leave the window, or a sender to fail."""
        self._room.clear()
        waiter: asyncio.Task[Any] = asyncio.create_task(self._room.wait())
        waiting: set[asyncio.Task[Any]] = {waiter, *senders}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


Read = Callable[[], Awaitable[Batch]]
Ack = Callable[[Batch, float], None]


class Pipeline:
    """Several batches in flight: destinations at the stream's pace, at least once.

    One reader takes batches from the stream, runs the handler routes on
    each (in order, as :meth:`Dispatcher.dispatch` does) and queues what
    each destination route wants. Each destination has a sender of its own
    that takes everything queued for it (up to the window) and sends it in
    one :meth:`Destination.send`: many small transactions travel in one
    round trip, and the stream reads on while the previous group is in
    flight. A batch is acknowledged (*ack*) once every route is done with
    it; the checkpoint confirms the contiguous prefix of acknowledged
    batches, so nothing is confirmed before the destinations have it.

    Each destination gets its events in commit order; different
    destinations, and the handlers, may be at different batches (within
    the window). A ``"stop"`` policy that gives up ends the run with its
    error; what was not acknowledged is not confirmed.

    Args:
        dispatcher: the routes, their retries and error policies.
        window_events: the most events in flight (read, not yet acknowledged).
        window_bytes: the most pgoutput bytes behind the batches in flight.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        window_events: int = 20_000,
        window_bytes: int = 8 << 20,
    ) -> None:
        if window_events < 1 or window_bytes < 1:
            raise ConfigurationError("the window must hold at least one event and one byte")
        self.dispatcher = dispatcher
        self.window_events = window_events
        self.window_bytes = window_bytes
        self._window = _Window(window_events, window_bytes)
        self._reading = False
        self._handling = False
        self._reader: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Batches read and not acknowledged yet."""
        return self._window.items

    @property
    def reading(self) -> bool:
        """Whether the reader waits for the stream (a stop may interrupt it)."""
        return self._reading

    @property
    def busy(self) -> bool:
        """Whether a batch is being handled or delivered (a forced stop would cut it short)."""
        return self._handling or self._window.items > 0

    def interrupt(self) -> None:
        """Stop waiting for the stream, if that is what the reader does (a graceful stop)."""
        if self._reading and self._reader is not None:
            self._reader.cancel()

    async def run(
        self,
        read: Read,
        ack: Ack,
        *,
        stop: asyncio.Event | None = None,
        before: Callable[[Batch], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver batches from *read* until *stop* is set or the stream ends.

        Args:
            read: returns the next batch (:meth:`walex.Stream.read`).
            ack: called with each batch once every route is done with it, and
                the seconds since it was read (:meth:`walex.Stream.ack`).
            stop: once set, no batch is read any more; what was read is still
                delivered (a wait to retry ends at once: :class:`Abandoned`).
            before: awaited with each batch before the routes see it.

        Raises:
            HandlerError, DestinationError, Abandoned: a route gave up, or a
                stop ended a wait to retry; what was not delivered is not
                acknowledged.
        """
        stop = stop if stop is not None else asyncio.Event()
        queues: dict[int, asyncio.Queue[tuple[_Item, list[Event]]]] = {
            id(route): asyncio.Queue() for route in self.dispatcher.routes if route.destination
        }
        senders = [
            asyncio.create_task(self._send(route, queues[id(route)], ack))
            for route in self.dispatcher.routes
            if route.destination is not None
        ]
        reader = self._reader = asyncio.create_task(self._read(read, ack, stop, before, queues))
        watcher = asyncio.create_task(self._watch(stop))
        try:
            await self._until_done(reader, senders)
        finally:
            self._reader = None
            for task in [reader, *senders, watcher]:
                task.cancel()
            await asyncio.gather(reader, *senders, watcher, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        # A stop while the reader waits for the stream ends that wait at once.
        await stop.wait()
        self.interrupt()

    async def _until_done(
        self,
        reader: asyncio.Task[None],
        senders: list[asyncio.Task[None]],
    ) -> None:
        everything: set[asyncio.Task[None]] = {reader, *senders}
        while True:
            done, _ = await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is reader and task.cancelled():
                    continue  # a graceful stop interrupted the wait for the stream
                error = task.exception()
                if error is not None:
                    raise error
            if reader.done():
                break
            everything -= done
        # The reader has stopped: the senders finish what it queued.
        while self._window.items:
            for task in senders:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await self._window.wait_empty(senders)

    async def _read(
        self,
        read: Read,
        ack: Ack,
        stop: asyncio.Event,
        before: Callable[[Batch], Awaitable[None]] | None,
        queues: dict[int, asyncio.Queue[tuple[_Item, list[Event]]]],
    ) -> None:
        dispatcher = self.dispatcher
        window = self._window
        while not stop.is_set():
            self._reading = True
            try:
                batch = await read()
            except StopAsyncIteration:
                return
            finally:
                self._reading = False
            read_at = time.perf_counter()
            self._handling = True
            if before is not None:
                await before(batch)
            jobs = await dispatcher.run_handlers(batch.events)
            self._handling = False
            if not jobs:
                ack(batch, time.perf_counter() - read_at)
                continue
            count = sum(len(events) for _, events in jobs)
            await window.take(count, batch.size)
            item = _Item(batch, count, len(jobs), read_at)
            for route, events in jobs:
                queues[id(route)].put_nowait((item, events))

    async def _send(
        self, route: Route, queue: asyncio.Queue[tuple[_Item, list[Event]]], ack: Ack
    ) -> None:
        window = self._window
        limit = self.window_events
        while True:
            group = [await queue.get()]
            total = len(group[0][1])
            while total < limit and not queue.empty():
                entry = queue.get_nowait()
                group.append(entry)
                total += len(entry[1])
            events = group[0][1] if len(group) == 1 else [e for _, ev in group for e in ev]
            await self.dispatcher.deliver(route, events)
            for item, _ in group:
                item.remaining -= 1
                if not item.remaining:
                    window.give(item.events, item.batch.size)
                    ack(item.batch, time.perf_counter() - item.read_at)


def _append_line(path: Path, line: str) -> None:
    # Durable before the transaction is confirmed: fsync, not just write.
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _describe(events: Sequence[Event]) -> str:
    if not events:
        return "no events"
    first = events[0]
    where = first.source.name if first.source is not None else f"message {first.prefix!r}"
    ids = ", ".join(e.id for e in events[:3]) + (", ..." if len(events) > 3 else "")
    return f"{len(events)} {first.type} event(s) of {where} [{ids}]"

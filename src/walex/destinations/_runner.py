"""Deliver a stream to destinations: routing, retries with backoff, error policy.

:func:`deliver` is the whole loop; :class:`Deliverer` is the part that takes
one batch at a time, for code that runs its own loop (the app reuses it).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Literal, get_args

from ..errors import ConfigurationError
from ..events import Batch, Event
from ._base import Destination, DestinationError

if TYPE_CHECKING:
    from ..stream import Stream

__all__ = ["Deliverer", "GiveUp", "OnError", "RetryPolicy", "Route", "deliver", "send_with_retry"]

logger = logging.getLogger("walex.destinations")

OnError = Literal["stop", "skip", "dead_letter"]
_POLICY = -1  # retries not given: the policy's
_EVENT_TYPES = frozenset({"insert", "update", "delete", "truncate", "message"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how long apart, a failed delivery is tried again.

    The delay doubles from *initial* up to *maximum*, with some jitter so
    that many walex processes do not knock at the same moment. A receiver's
    ``Retry-After`` replaces the delay (up to *max_retry_after*).

    Attributes:
        retries: tries after the first; ``None`` tries forever.
        initial: the first delay, in seconds.
        maximum: the longest delay.
        multiplier: the growth of the delay from one try to the next.
        jitter: the delay varies by up to this fraction.
        max_retry_after: the longest ``Retry-After`` obeyed.
    """

    retries: int | None = 10
    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    max_retry_after: float = 600.0

    def __post_init__(self) -> None:
        if self.retries is not None and (not isinstance(self.retries, int) or self.retries < 0):
            raise ConfigurationError("retries must be a whole number of at least 0, or None")
        if not (0 <= self.initial <= self.maximum) or self.multiplier < 1:
            raise ConfigurationError(
                "retry delays need 0 <= initial <= maximum and multiplier >= 1"
            )

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before try number *attempt* + 1 (*attempt* counts from 1)."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after)
        base = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return base * (1 + random.uniform(-self.jitter, self.jitter))

    def gives_up(self, attempt: int) -> bool:
        """Whether *attempt* failed tries are all there may be."""
        return self.retries is not None and attempt > self.retries


def _table_matcher(patterns: Sequence[str]) -> tuple[bool, list[str]]:
    # "todo" means public.todo, as in the app's settings.
    return "*" in patterns, [p if "." in p else f"public.{p}" for p in patterns]


@dataclass(slots=True)
class Route:
    """One destination with the events it gets and what to do when it fails.

    Args:
        destination: where the events go.
        tables: ``"schema.table"`` names, or ``"table"`` for one in
            ``public``; shell-style patterns allowed (``"app.*"``,
            ``"order_*"``); ``"*"`` is everything, logical messages included
            (they have no table).
        types: the event types it gets (``"insert"``, ``"update"``,
            ``"delete"``, ``"truncate"``, ``"message"``); ``None``: all.
        on_error: when the retries are spent, or the error cannot be retried:
            ``"stop"`` raises (nothing more is confirmed; a restart resends),
            ``"skip"`` logs and goes on, ``"dead_letter"`` hands the events to
            *dead_letter* and goes on.
        retries: tries after the first (``None``: forever); when given, it
            overrides *policy*'s.
        policy: the backoff (and the retries, 10 by default).
        dead_letter: the destination for ``on_error="dead_letter"``.
    """

    destination: Destination
    tables: Sequence[str] = ("*",)
    types: Collection[str] | None = None
    on_error: OnError = "stop"
    retries: int | None = _POLICY
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    dead_letter: Destination | None = None
    delivered: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    _all: bool = field(init=False, default=True)
    _patterns: list[str] = field(init=False, default_factory=list)
    _types: frozenset[str] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if isinstance(self.tables, str):
            self.tables = [self.tables]
        if not self.tables or not all(isinstance(t, str) and t for t in self.tables):
            raise ConfigurationError("tables must be a list of table names or patterns")
        if self.types is not None:
            types = [self.types] if isinstance(self.types, str) else list(self.types)
            unknown = set(types) - _EVENT_TYPES
            if unknown:
                raise ConfigurationError(
                    f"unknown event type(s) {sorted(unknown)}; use {sorted(_EVENT_TYPES)}"
                )
            self._types = frozenset(types)
        if self.on_error not in get_args(OnError):
            raise ConfigurationError(
                f"on_error must be 'stop', 'skip' or 'dead_letter', not {self.on_error!r}"
            )
        if self.on_error == "dead_letter" and self.dead_letter is None:
            raise ConfigurationError("on_error='dead_letter' needs a dead_letter destination")
        if self.retries == _POLICY:
            self.retries = self.policy.retries
        elif self.retries != self.policy.retries:
            self.policy = RetryPolicy(
                retries=self.retries,
                initial=self.policy.initial,
                maximum=self.policy.maximum,
                multiplier=self.policy.multiplier,
                jitter=self.policy.jitter,
                max_retry_after=self.policy.max_retry_after,
            )
        self._all, self._patterns = _table_matcher(list(self.tables))

    def matches(self, event: Event) -> bool:
        """Whether *event* goes to this route's destination."""
        if self._types is not None and event.type not in self._types:
            return False
        if self._all:
            return True
        source = event.source
        if source is None:
            return False
        name = f"{source.schema}.{source.table}"
        return any(fnmatch.fnmatchcase(name, p) for p in self._patterns)


def _as_error(exc: BaseException, destination: Destination) -> DestinationError:
    if isinstance(exc, DestinationError):
        return exc
    # A custom destination's own exception: unknown, so worth another try.
    error = DestinationError(
        f"{type(exc).__name__}: {exc}", destination=destination.name, retryable=True
    )
    error.__cause__ = exc
    return error


async def _retrying(
    what: str, destination: Destination, policy: RetryPolicy, call: Callable[[], Awaitable[None]]
) -> None:
    """Run ``call()`` (a coroutine function) until it succeeds or the policy gives up."""
    attempt = 0
    while True:
        try:
            await call()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _as_error(exc, destination)
            attempt += 1
            if not error.retryable or policy.gives_up(attempt):
                if error is exc:
                    raise
                raise error from exc
            delay = policy.delay(attempt, error.retry_after)
            logger.warning(
                "%s %s failed (try %d), again in %.2fs: %s",
                destination.name,
                what,
                attempt,
                delay,
                error,
            )
            await asyncio.sleep(delay)


GiveUp = Callable[[Sequence[Event], DestinationError], Awaitable[None]]


async def send_with_retry(
    destination: Destination,
    events: Sequence[Event],
    policy: RetryPolicy,
    *,
    on_give_up: GiveUp,
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

    This is the error policy of :class:`Deliverer`, usable on its own (the
    app's destinations, a loop of your own).

    Returns:
        How many events the destination accepted.
    """
    pending: Sequence[Event] = events
    accepted = 0
    attempt = 0
    while True:
        try:
            await destination.send(pending)
            return accepted + len(pending)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _as_error(exc, destination)
            if error.failed:
                # Those before the failed ones were accepted: resend only the rest.
                accepted += len(pending) - len(error.failed)
                pending = error.failed
            attempt += 1
            if error.retryable and not policy.gives_up(attempt):
                delay = policy.delay(attempt, error.retry_after)
                logger.warning(
                    "%s: %d event(s) not delivered (try %d), again in %.2fs: %s",
                    destination.name,
                    len(pending),
                    attempt,
                    delay,
                    error,
                )
                await asyncio.sleep(delay)
                continue
            rejected = error.rejected
            if not error.retryable and rejected and len(rejected) < len(pending):
                # Only these were refused: the policy takes them, the rest go on.
                await on_give_up(rejected, error)
                pending = pending[len(rejected) :]
                attempt = 0
                continue
            await on_give_up(pending, error)
            return accepted


class Deliverer:
    """Sends each batch to the destinations whose routes match its events.

    Use it as ``async with``: it starts the destinations (retrying as the
    policy says) and closes them. :meth:`handle` returns once every route
    has delivered, skipped or dead-lettered its events, and raises when one
    of them stops: the batch must then not be confirmed.

    Args:
        routes: :class:`Route` objects, or bare destinations that take the
            defaults given here.
        tables, types, on_error, retries, policy, dead_letter: the defaults
            for bare destinations (see :class:`Route`).
    """

    def __init__(
        self,
        routes: Sequence[Route | Destination],
        *,
        tables: Sequence[str] = ("*",),
        types: Collection[str] | None = None,
        on_error: OnError = "stop",
        retries: int | None = _POLICY,
        policy: RetryPolicy | None = None,
        dead_letter: Destination | None = None,
    ) -> None:
        if not routes:
            raise ConfigurationError("deliver to at least one destination")
        self.routes: list[Route] = [
            r
            if isinstance(r, Route)
            else Route(
                r,
                tables=tables,
                types=types,
                on_error=on_error,
                retries=retries,
                policy=policy or RetryPolicy(),
                dead_letter=dead_letter,
            )
            for r in routes
        ]
        self._started: list[Destination] = []

    async def __aenter__(self) -> Deliverer:
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
        """Start every destination (and dead-letter destination) once."""
        for route in self.routes:
            for dest in (route.destination, route.dead_letter):
                if dest is None or any(dest is s for s in self._started):
                    continue
                self._started.append(dest)
                await _retrying("start", dest, route.policy, dest.start)

    async def close(self) -> None:
        """Close every destination that was started, whatever happens."""
        started, self._started = self._started, []
        for dest in reversed(started):
            try:
                await dest.close()
            except Exception:
                logger.exception("closing destination %s failed", dest.name)

    async def handle(self, batch: Batch | Sequence[Event]) -> None:
        """Deliver one batch to every route that wants some of its events.

        Raises:
            DestinationError: a route with ``on_error="stop"`` gave up.
        """
        events = batch.events if isinstance(batch, Batch) else batch
        jobs = []
        for route in self.routes:
            if route._all and route._types is None:
                mine = list(events)
            else:
                mine = [e for e in events if route.matches(e)]
            if mine:
                jobs.append(self._send(route, mine))
        if not jobs:
            return
        if len(jobs) == 1:
            await jobs[0]
            return
        tasks = [asyncio.ensure_future(job) for job in jobs]
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _send(self, route: Route, events: list[Event]) -> None:
        async def give_up(given_up: Sequence[Event], error: DestinationError) -> None:
            await self._give_up(route, given_up, error)

        route.delivered += await send_with_retry(
            route.destination, events, route.policy, on_give_up=give_up
        )

    async def _give_up(
        self, route: Route, events: Sequence[Event], error: DestinationError
    ) -> None:
        ids = f"{events[0].id} .. {events[-1].id}" if events else "-"
        if route.on_error == "stop":
            raise error
        if route.on_error == "skip":
            logger.error(
                "%s: skipped %d event(s) (%s): %s", route.destination.name, len(events), ids, error
            )
            route.skipped += len(events)
            return
        dead = route.dead_letter
        assert dead is not None  # checked by Route
        logger.error(
            "%s: %d event(s) (%s) go to the dead letter %s: %s",
            route.destination.name,
            len(events),
            ids,
            dead.name,
            error,
        )

        async def to_dead_letter() -> None:
            await dead.send(events)

        await _retrying("dead letter", dead, route.policy, to_dead_letter)
        route.dead_lettered += len(events)


async def deliver(
    stream: Stream,
    destinations: Sequence[Route | Destination],
    *,
    tables: Sequence[str] = ("*",),
    types: Collection[str] | None = None,
    on_error: OnError = "stop",
    retries: int | None = _POLICY,
    policy: RetryPolicy | None = None,
    dead_letter: Destination | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Deliver every batch of an open *stream* to *destinations*, at least once.

    Each batch is handed on only after every destination that wants some of
    its events has accepted them (or, by its route's policy, skipped or
    dead-lettered them). Returns when the stream ends or *stop* is set;
    raises when a destination with ``on_error="stop"`` gives up. Either way
    the stream has confirmed only what was delivered.

    Args:
        stream: an open :class:`walex.Stream` (inside its ``async with``).
        destinations: :class:`Route` objects or destinations.
        tables, types, on_error, retries, policy, dead_letter: the defaults
            for bare destinations (see :class:`Route`).
        stop: once set, return after the batch in hand (or the next one).

    Example::

        async with walex.connect(dsn, publication="app", slot="cdc", durable=True) as stream:
            await deliver(stream, [RedisStreams(stream="cdc:{table}")], retries=None)
    """
    async with Deliverer(
        destinations,
        tables=tables,
        types=types,
        on_error=on_error,
        retries=retries,
        policy=policy,
        dead_letter=dead_letter,
    ) as deliverer:
        if stop is not None and stop.is_set():
            return
        async for batch in stream:
            await deliverer.handle(batch)
            if stop is not None and stop.is_set():
                return

"""Deliver a stream to destinations: the loop around :mod:`walex.routing`.

:func:`deliver` is the whole loop; :class:`Deliverer` takes one batch at a
time, for code that runs its own loop. Routing, retries and the error policy
are :mod:`walex.routing`'s, the same engine that runs the app's handlers and
destinations: this module only keeps the destination-shaped names and
defaults. It must not route, retry or match table names itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, DestinationError
from ..events import Batch, Event
from ..routing import (
    Abandoned,
    DeadLetterSink,
    Destination,
    Dispatcher,
    ErrorPolicy,
    Pipeline,
    RetryPolicy,
    send_with_retry,
)
from ..routing import Route as _Route

if TYPE_CHECKING:
    from ..stream import Stream

__all__ = ["Deliverer", "GiveUp", "OnError", "RetryPolicy", "Route", "deliver", "send_with_retry"]

logger = logging.getLogger("walex.destinations")

OnError = ErrorPolicy
"""``"stop"``, ``"skip"`` or ``"dead_letter"`` (:data:`walex.routing.ErrorPolicy`)."""

GiveUp = Callable[[Sequence[Event], DestinationError], Awaitable[None]]
"""What :func:`send_with_retry` hands the events it gives up on to."""

_POLICY: Any = object()  # retries not given: the policy's


class Route(_Route):
    """One destination with the events it gets and what to do when it fails.

    A :class:`walex.routing.Route` whose target is a destination, with the
    arguments in the order this class always took them.

    Args:
        destination: where the events go.
        tables: ``"schema.table"`` names, or ``"table"`` for one in
            ``public``; shell-style patterns allowed (``"app.*"``,
            ``"order_*"``); ``"*"`` is everything, logical messages included
            (they have no table). The grammar is :mod:`walex.names`.
        types: the event types it gets (``"insert"``, ``"update"``,
            ``"delete"``, ``"truncate"``, ``"message"``); ``None``: all.
        on_error: when the retries are spent, or the error cannot be retried:
            ``"stop"`` raises (nothing more is confirmed; a restart resends),
            ``"skip"`` logs and goes on, ``"dead_letter"`` hands the events to
            *dead_letter* and goes on.
        retries: tries after the first (``None``: forever); when given, it
            overrides *policy*'s.
        policy: the backoff (and the retries: 3 by default).
        dead_letter: for ``on_error="dead_letter"``: a destination (it gets
            the events), a callable taking a :class:`~walex.routing.DeadLetter`,
            or a JSON-lines file path.
    """

    __slots__ = ()

    def __init__(
        self,
        destination: Destination,
        tables: str | Sequence[str] = ("*",),
        types: str | Collection[str] | None = None,
        on_error: OnError = "stop",
        retries: int | None = _POLICY,
        policy: RetryPolicy | None = None,
        dead_letter: DeadLetterSink | None = None,
    ) -> None:
        for method in ("start", "send", "close"):
            if not callable(getattr(destination, method, None)):
                raise ConfigurationError(
                    f"{destination!r} is not a destination: it has no {method}() "
                    "(see walex.destinations.Destination)"
                )
        if isinstance(tables, str):
            tables = [tables]
        if not tables or not all(isinstance(t, str) and t for t in tables):
            raise ConfigurationError("tables must be a list of table names or patterns")
        kwargs: dict[str, Any] = {} if retries is _POLICY else {"retries": retries}
        super().__init__(
            destination,
            tables=tables,
            types=types,
            on_error=on_error,
            policy=policy,
            dead_letter=dead_letter,
            **kwargs,
        )


class Deliverer(Dispatcher):
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
        stop: once set, a wait to retry ends at once: :meth:`handle` raises
            :class:`~walex.routing.Abandoned` and the batch must not be
            confirmed.
    """

    def __init__(
        self,
        routes: Sequence[_Route | Destination],
        *,
        tables: Sequence[str] = ("*",),
        types: Collection[str] | None = None,
        on_error: OnError = "stop",
        retries: int | None = _POLICY,
        policy: RetryPolicy | None = None,
        dead_letter: DeadLetterSink | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        if not routes:
            raise ConfigurationError("deliver to at least one destination")
        super().__init__(
            [
                r
                if isinstance(r, _Route)
                else Route(
                    r,
                    tables=tables,
                    types=types,
                    on_error=on_error,
                    retries=retries,
                    policy=policy,
                    dead_letter=dead_letter,
                )
                for r in routes
            ],
            stop=stop,
        )

    async def handle(self, batch: Batch | Sequence[Event]) -> None:
        """Deliver one batch to every route that wants some of its events.

        Raises:
            DestinationError: a route with ``on_error="stop"`` gave up.
            Abandoned: *stop* was set while a route waited to retry.
        """
        await self.dispatch(batch.events if isinstance(batch, Batch) else batch)


async def deliver(
    stream: Stream,
    destinations: Sequence[_Route | Destination],
    *,
    tables: Sequence[str] = ("*",),
    types: Collection[str] | None = None,
    on_error: OnError = "stop",
    retries: int | None = _POLICY,
    policy: RetryPolicy | None = None,
    dead_letter: DeadLetterSink | None = None,
    stop: asyncio.Event | None = None,
    window_events: int = 20_000,
    window_bytes: int = 8 << 20,
) -> None:
    """Deliver every batch of an open *stream* to *destinations*, at least once.

    Delivery is pipelined (:class:`walex.routing.Pipeline`): the stream reads
    ahead while the destinations send, and each destination gets everything
    that is waiting for it (many small transactions) in one ``send``, up to
    the window. A batch is confirmed to Postgres only after every
    destination that wants some of its events has accepted them (or, by its
    route's policy, skipped or dead-lettered them), and every batch before
    it too. Returns when the stream ends or *stop* is set; raises when a
    destination with ``on_error="stop"`` gives up. Either way the stream has
    confirmed only what was delivered.

    Args:
        stream: an open :class:`walex.Stream` (inside its ``async with``);
            read with :meth:`~walex.Stream.read` and
            :meth:`~walex.Stream.ack`, not iterated.
        destinations: :class:`Route` objects or destinations.
        tables, types, on_error, retries, policy, dead_letter: the defaults
            for bare destinations (see :class:`Route`).
        stop: once set, no more batches are read; what was read is
            delivered, then it returns. A destination waiting to retry
            stops waiting at once; that transaction is not confirmed.
        window_events, window_bytes: the most events, and pgoutput bytes,
            read and not yet delivered.

    Example::

        async with walex.connect(dsn, publication="app", slot="cdc", durable=True) as stream:
            await deliver(stream, [RedisStreams(stream="cdc:{table}")], retries=None)
    """
    stop = stop if stop is not None else asyncio.Event()
    async with Deliverer(
        destinations,
        tables=tables,
        types=types,
        on_error=on_error,
        retries=retries,
        policy=policy,
        dead_letter=dead_letter,
        stop=stop,
    ) as deliverer:
        if stop.is_set():
            return
        pipeline = Pipeline(deliverer, window_events=window_events, window_bytes=window_bytes)
        try:
            await pipeline.run(stream.read, lambda batch, _: stream.ack(batch), stop=stop)
        except Abandoned:
            logger.warning(
                "stopped while a destination was waiting to retry; the transactions in flight "
                "are not confirmed and come again on restart"
            )
            await stream.aclose()

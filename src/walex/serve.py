"""Running apps as a service: until SIGINT or SIGTERM, several at once.

:func:`serve` starts each app, waits until they have all stopped, and turns
the first signal into a graceful stop of every app and the second into a
forced one. It owns the process's signals and the apps' lifetimes; it knows
an app only through :class:`Service` (start, wait, stop), not its handlers
or its stream, and must not import :mod:`walex.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, Protocol

from .errors import ConfigurationError, ForcedStop, WalexError

__all__ = ["Service", "run", "serve"]

logger = logging.getLogger("walex.app")

# Marks the log line of an error that is also raised: `walex` prints it once.
_FATAL = {"walex_fatal": True}


class Service(Protocol):
    """What :func:`serve` runs: a :class:`~walex.WalEx` app, or anything alike."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> Any: ...

    @property
    def running(self) -> bool: ...

    @property
    def forced(self) -> bool:
        """Whether a forced stop left a transaction unconfirmed."""

    async def start(self) -> None: ...

    async def wait(self) -> None: ...

    def request_stop(self) -> None: ...

    def force_stop(self) -> None: ...


async def serve(*apps: Service, stop_all_on_error: bool = False, signals: bool = True) -> None:
    """Run *apps* until SIGINT/SIGTERM (or until they have all stopped).

    Each app has its own slot and stream. One app that fails does not stop
    the others unless *stop_all_on_error* is true. A first signal stops every
    app gracefully; a second one cancels running handlers (and destination
    sends), which makes it raise if a transaction was left unconfirmed.

    Args:
        apps: the apps to run.
        stop_all_on_error: stop every app as soon as one fails.
        signals: install SIGINT/SIGTERM handlers (main thread only).

    Raises:
        WalexError: the first error that stopped an app (the others are
            logged), or a forced stop that left a transaction unconfirmed.
    """
    if not apps:
        raise ConfigurationError("walex.run() needs at least one app")
    if len({a.settings.slot_name for a in apps}) != len(apps):
        raise ConfigurationError("each app needs its own slot_name (or name)")
    loop = asyncio.get_running_loop()
    signalled = 0
    lives: dict[asyncio.Task[None], Service] = {}

    def stop_all(force: bool = False) -> None:
        for task, app in lives.items():
            if app.running:
                app.force_stop() if force else app.request_stop()
            elif not task.done():
                task.cancel()  # still starting (or waiting as a standby for the slot)

    def on_signal(signum: int) -> None:
        nonlocal signalled
        signalled += 1
        if signalled == 1:
            logger.info("%s: stopping gracefully (again to force)", signal.Signals(signum).name)
            stop_all()
        else:
            logger.warning("stopping now: running handlers are cancelled")
            stop_all(force=True)

    installed: list[int] = []
    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError):
                break  # not the main thread: the caller handles signals
    errors: list[BaseException] = []
    try:
        for app in apps:
            lives[loop.create_task(_live(app), name=f"walex:{app.name}:life")] = app
        pending = set(lives)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = task.exception() if not task.cancelled() else None
                if failure is not None:
                    errors.append(failure)
                    if stop_all_on_error:
                        stop_all()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        for task, app in lives.items():
            if not task.done():
                task.cancel()
            if app.running:
                app.force_stop()
            with contextlib.suppress(BaseException):
                await task
    if errors:
        for extra in errors[1:]:
            logger.error("also failed: %s", extra)
        raise errors[0]


async def _live(app: Service) -> None:
    """Start *app* and wait until it stops; raise what stopped it."""
    try:
        await app.start()
    except WalexError as exc:
        # Raised to the caller, which says it (the command prints it once).
        logger.error("%s: could not start: %s", app.name, exc, extra=_FATAL)
        raise
    await app.wait()
    if app.forced:
        raise ForcedStop(
            f"{app.name}: forced stop: the transaction being handled was not confirmed "
            "and is delivered again when the app restarts"
        )


def run(*apps: Service, stop_all_on_error: bool = False) -> None:
    """Run *apps* (each with its own slot) until SIGINT or SIGTERM; block till done.

    Example::

        walex.run(orders_app, billing_app)

    Raises:
        WalexError: the first error that stopped an app.
    """
    asyncio.run(serve(*apps, stop_all_on_error=stop_all_on_error))

"""NATS JetStream: publish each event and wait for JetStream's ack.

It owns the NATS client; routing and retries are :mod:`walex.routing`'s.

Every message carries ``Nats-Msg-Id`` = the event's id, so JetStream's
duplicate window (two minutes by default) drops the replays that follow a
crash or a broken connection: consumers see each change once. The subject
is a template; ``"cdc.{schema}.{table}.{pk}"`` keeps every change of one row
on one subject, in commit order, for consumers that partition by subject.

A batch counts as delivered when JetStream acknowledged every message of it
(the message is stored in the stream, replicated as the stream says).

walex does not let the NATS client reconnect on its own: a message written
into a broken connection would be lost while later ones, sent after the
client reconnected, were stored. Instead a broken connection fails the
send, and walex reconnects and sends again from the first message without
an ack, so JetStream stores the messages in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..events import Event
from ..wire import dumpb
from ._base import DestinationError, Template, require

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

__all__ = ["JetStream", "subject_escape"]

# NATS subjects split on "." and match on "*" and ">"; whitespace ends them.
_SUBJECT_UNSAFE = str.maketrans(dict.fromkeys(".*> \t\r\n", "_"))


def subject_escape(value: str) -> str:
    """A value made safe as (part of) one subject token."""
    return value.translate(_SUBJECT_UNSAFE) or "_"


def _wildcards(pattern: str) -> str:
    return ".".join("*" if "{" in token else token for token in pattern.split("."))


class JetStream:
    """Publish events to NATS JetStream, deduplicated by ``Nats-Msg-Id``.

    Args:
        servers: the NATS URL(s) (``nats://user:pass@host:4222``).
        subject: the subject, a template over ``{schema}``, ``{table}``,
            ``{type}``, ``{database}``, ``{pk}`` (values with ``.``, ``*``,
            ``>`` or spaces have them replaced by ``_``).
        stream: the JetStream stream the subjects belong to. When given,
            each publish says so (``Nats-Expected-Stream``).
        create_stream: create *stream* if it does not exist, for
            *stream_subjects* (default: the subject template with each
            field as ``*``) with *duplicate_window*.
        stream_subjects: the subjects of a created stream.
        duplicate_window: seconds JetStream remembers message ids (for a
            created stream).
        credentials: a ``.creds`` file for NATS authentication.
        timeout: seconds to connect, and to wait for the acks of a batch.
        chunk: the most messages awaiting their ack at once.
        name: the name in logs.

    Raises:
        ConfigurationError: nats-py is missing (``pip install "walex[nats]"``),
            or a setting is wrong.
    """

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        subject: str = "walex.{schema}.{table}",
        stream: str | None = None,
        create_stream: bool = False,
        stream_subjects: Sequence[str] | None = None,
        duplicate_window: float = 120.0,
        credentials: str | None = None,
        timeout: float = 10.0,
        chunk: int = 1000,
        name: str = "nats",
    ) -> None:
        require("nats")
        if create_stream and not stream:
            raise ConfigurationError("nats: create_stream needs the stream's name (stream=...)")
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigurationError("nats chunk must be a whole number of at least 1")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.subject = Template(subject, escape=subject_escape)
        self.stream = stream
        self.create_stream = create_stream
        self.stream_subjects = list(stream_subjects or [_wildcards(subject)])
        self.duplicate_window = duplicate_window
        self.credentials = credentials
        self.timeout = timeout
        self.chunk = chunk
        self.name = name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False

    def __repr__(self) -> str:
        return f"JetStream({self.servers!r}, subject={self.subject.pattern!r})"

    async def start(self) -> None:
        """Connect, and create the stream if asked to."""
        import nats.errors
        import nats.js.errors
        from nats.aio.client import Client

        if self._nc is not None and self._nc.is_connected:
            return
        await self._drop()

        async def quiet(*_: Any) -> None:
            pass  # walex reports the failures it acts on; the client's are noise

        failures: list[Exception] = []

        async def remember(exc: Exception) -> None:
            # What went wrong with a server (refused, unknown host): the
            # client's final NoServersError alone does not say.
            if not isinstance(exc, nats.errors.NoServersError):
                failures[:] = [exc]

        nc = Client()
        try:
            # nats-py keeps knocking at an unreachable server however
            # allow_reconnect is set (max_reconnect_attempts=0 means no limit
            # there), so one try per server, bounded by our own timeout: the
            # retry policy decides when to knock again, and logs each try.
            async with asyncio.timeout(self.timeout):
                await nc.connect(
                    self.servers,
                    allow_reconnect=False,
                    connect_timeout=math.ceil(self.timeout),  # ours bounds it to the second
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    user_credentials=self.credentials,
                    error_cb=remember,
                    disconnected_cb=quiet,
                    closed_cb=quiet,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            cause: BaseException = failures[-1] if failures else exc
            why = (
                f"no answer within {self.timeout}s"
                if cause is exc and isinstance(exc, TimeoutError)
                else f"{type(cause).__name__}: {cause}"
            )
            raise DestinationError(
                f"cannot connect to {', '.join(self.servers)}: {why}", destination=self.name
            ) from exc
        self._nc = nc
        self._js = nc.jetstream(timeout=self.timeout)
        if self.create_stream and not self._stream_ready:
            try:
                await self._ensure_stream(self._js)
            except nats.js.errors.Error as exc:
                raise DestinationError(
                    f"cannot create stream {self.stream}: {exc}",
                    destination=self.name,
                    retryable=False,
                ) from exc
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                raise DestinationError(
                    f"cannot create stream {self.stream}: {type(exc).__name__}: {exc}",
                    destination=self.name,
                ) from exc
            self._stream_ready = True

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        import nats.js.errors

        assert self.stream is not None
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        await js.add_stream(
            name=self.stream,
            subjects=self.stream_subjects,
            duplicate_window=self.duplicate_window,
        )

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            # A broken connection may fail to close: it is gone either way.
            with contextlib.suppress(Exception):
                await nc.close()

    async def close(self) -> None:
        """Close the connection."""
        await self._drop()

    async def send(self, events: Sequence[Event]) -> None:
        """Publish every event in order; return when JetStream acked them all."""
        import nats.errors
        import nats.js.errors

        await self.start()
        js = self._js
        assert js is not None
        render = self.subject.render
        for i in range(0, len(events), self.chunk):
            chunk = events[i : i + self.chunk]
            futures: list[asyncio.Future[Any]] = []
            try:
                async with asyncio.timeout(self.timeout):
                    for event in chunk:
                        futures.append(
                            await js.publish_async(
                                render(event),
                                dumpb(event),
                                stream=self.stream,
                                headers={"Nats-Msg-Id": event.id},
                            )
                        )
                    results = await asyncio.gather(*futures, return_exceptions=True)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                acked = _acked(futures)
                for future in futures:
                    future.cancel()
                await self._drop()
                raise DestinationError(
                    f"publish failed: {type(exc).__name__}: {exc}",
                    destination=self.name,
                    failed=events[i + acked :],
                ) from exc
            for k, result in enumerate(results):
                if isinstance(result, nats.js.errors.NoStreamResponseError):
                    await self._drop()
                    subject = render(chunk[k])
                    raise DestinationError(
                        f"no JetStream stream stores subject {subject!r}"
                        + (f" (stream {self.stream!r} does not exist)" if self.stream else "")
                        + ": create one, e.g. nats stream add "
                        + shlex.quote(self.stream or "CDC")
                        + " --subjects "
                        + shlex.quote(_wildcard(subject))
                        + ", or set stream and create_stream = true on the destination",
                        destination=self.name,
                        failed=events[i + k :],
                    ) from result
                if isinstance(result, BaseException):
                    # JetStream refused it (no stream for the subject, ...) or
                    # the connection broke: a new connection may do better.
                    retryable = not isinstance(result, nats.js.errors.BadRequestError)
                    await self._drop()
                    raise DestinationError(
                        f"publish to {render(chunk[k])} failed: {type(result).__name__}: {result}",
                        destination=self.name,
                        retryable=retryable,
                        failed=events[i + k :],
                    ) from result


def _wildcard(subject: str) -> str:
    """The subject's first token and ``>``: what a stream for such subjects would take."""
    return subject.split(".", 1)[0] + ".>" if "." in subject else subject


def _acked(futures: list[asyncio.Future[Any]]) -> int:
    """How many futures at the head got their ack."""
    n = 0
    for future in futures:
        if not future.done() or future.cancelled() or future.exception() is not None:
            break
        n += 1
    return n

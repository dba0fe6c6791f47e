"""Redis Streams: ``XADD`` each event to a stream named by a template.

It owns the Redis client; routing and retries are :mod:`walex.routing`'s.

Each entry has two fields: ``id``, the event's idempotency key, and
``event``, its JSON (``docs/wire-format.md``). Redis has no duplicate
detection for ``XADD``: after a crash or a broken connection walex sends the
unconfirmed events again, so a consumer keeps the ids it has processed (for
one stream, remembering the highest ``commit_lsn``/``seq`` is enough: they
only grow, replays repeat old ones).

A batch counts as delivered when Redis answered every ``XADD`` of it. That
is in Redis's memory; what survives a Redis restart depends on its own
persistence (``appendonly yes``, ``appendfsync``). ``wait_replicas=1`` also
waits (``WAIT``) until that many replicas have the entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..events import Event
from ..wire import dumpb
from ._base import DestinationError, Template, require

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["RedisStreams"]


class RedisStreams:
    """``XADD`` events to Redis Streams.

    Args:
        url: the Redis URL (``redis://user:pass@host:6379/0``, ``rediss://`` for TLS).
        stream: the stream name, a template over ``{schema}``, ``{table}``,
            ``{type}``, ``{database}``, ``{pk}``: ``"cdc:{schema}.{table}"``
            gives a stream per table, in commit order.
        maxlen: cap each stream at about this many entries (``MAXLEN ~``);
            ``None`` keeps everything.
        exact_maxlen: trim to exactly *maxlen* (slower than ``~``).
        wait_replicas: after each batch, wait until this many replicas have it.
        timeout: seconds for a connection or an answer.
        chunk: the most commands in one pipeline.
        name: the name in logs.

    Raises:
        ConfigurationError: redis is missing (``pip install "walex[redis]"``),
            or a setting is wrong.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream: str = "walex:{schema}.{table}",
        maxlen: int | None = None,
        exact_maxlen: bool = False,
        wait_replicas: int = 0,
        timeout: float = 10.0,
        chunk: int = 1000,
        name: str = "redis",
    ) -> None:
        require("redis")
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 1):
            raise ConfigurationError("redis maxlen must be a whole number of at least 1")
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigurationError("redis chunk must be a whole number of at least 1")
        self.url = url
        self.stream = Template(stream)
        self.maxlen = maxlen
        self.approximate = not exact_maxlen
        self.wait_replicas = wait_replicas
        self.timeout = timeout
        self.chunk = chunk
        self.name = name
        self._client: redis.asyncio.Redis | None = None

    def __repr__(self) -> str:
        return f"RedisStreams({self.url!r}, stream={self.stream.pattern!r})"

    async def start(self) -> None:
        """Connect and check the server answers."""
        import redis.asyncio
        import redis.exceptions

        if self._client is None:
            self._client = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        try:
            await self._client.ping()
        except redis.exceptions.RedisError as exc:
            raise self._error(exc) from exc

    async def close(self) -> None:
        """Close the connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _error(self, exc: Exception) -> DestinationError:
        import redis.exceptions

        # Connection trouble passes; an error answer (WRONGTYPE, NOPERM...) does not.
        retryable = isinstance(
            exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        ) or not isinstance(exc, redis.exceptions.ResponseError)
        return DestinationError(
            f"{type(exc).__name__}: {exc}", destination=self.name, retryable=retryable
        )

    async def send(self, events: Sequence[Event]) -> None:
        """``XADD`` every event, in order; return when Redis answered all of them."""
        import redis.exceptions

        if self._client is None:
            await self.start()
        client = self._client
        assert client is not None
        render = self.stream.render
        for i in range(0, len(events), self.chunk):
            pipe = client.pipeline(transaction=False)
            for event in events[i : i + self.chunk]:
                fields: dict[Any, Any] = {"id": event.id, "event": dumpb(event)}
                pipe.xadd(render(event), fields, maxlen=self.maxlen, approximate=self.approximate)
            try:
                await pipe.execute()
                if self.wait_replicas:
                    got = await client.wait(self.wait_replicas, int(self.timeout * 1000))
                    if int(got) < self.wait_replicas:
                        raise DestinationError(
                            f"only {got} of {self.wait_replicas} replicas have the events",
                            destination=self.name,
                            failed=events[i:],
                        )
            except redis.exceptions.RedisError as exc:
                error = self._error(exc)
                error.failed = events[i:]
                raise error from exc

"""RabbitMQ: publish each event to an exchange, with publisher confirms.

It owns the AMQP client; routing and retries are :mod:`walex.routing`'s.

Messages are persistent (``delivery_mode=2``), carry ``message_id`` = the
event's id (consumers drop replays by it) and ``content_type =
application/json``; the routing key is a template. A batch counts as
delivered when the broker confirmed every message of it (``basic.ack``):
for a durable queue, the message is then on disk.

With ``mandatory=True`` (the default) a message that no queue is bound to
receive comes back and fails the send, rather than vanish: walex never drops
a change quietly. Bind a queue for every routing key walex publishes, or set
``mandatory = false`` where dropping unrouted messages is what you want.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..events import Event
from ..wire import dumpb
from ._base import DestinationError, Template, require

if TYPE_CHECKING:
    import aio_pika.abc

__all__ = ["RabbitMQ", "routing_escape"]

# Topic exchanges split routing keys on "." and match "*" and "#".
_KEY_UNSAFE = str.maketrans(dict.fromkeys(".*#", "_"))
_EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")


def routing_escape(value: str) -> str:
    """A value made safe as one word of a routing key."""
    return value.translate(_KEY_UNSAFE) or "_"


class RabbitMQ:
    """Publish events to a RabbitMQ exchange with publisher confirms.

    Args:
        url: the AMQP URL (``amqp://guest:guest@127.0.0.1:5672/``, ``amqps://`` for TLS).
        exchange: the exchange; ``""`` is the default exchange, where the
            routing key is a queue's name.
        routing_key: a template over ``{schema}``, ``{table}``, ``{type}``,
            ``{database}``, ``{pk}`` (``.``, ``*`` and ``#`` in values become ``_``).
        declare_exchange: declare the exchange (durable, of *exchange_type*);
            ``False`` checks that it exists.
        exchange_type: ``"topic"`` (default), ``"direct"``, ``"fanout"`` or ``"headers"``.
        mandatory: fail on a message no queue receives (see the module's notes).
        headers: more AMQP headers for every message.
        timeout: seconds to connect, and to wait for the confirms of a batch.
        chunk: the most messages awaiting their confirm at once.
        name: the name in logs.

    Raises:
        ConfigurationError: aio-pika is missing (``pip install "walex[rabbitmq]"``),
            or a setting is wrong.
    """

    def __init__(
        self,
        url: str = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        exchange: str = "walex",
        routing_key: str = "{schema}.{table}.{type}",
        declare_exchange: bool = True,
        exchange_type: str = "topic",
        mandatory: bool = True,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        chunk: int = 1000,
        name: str = "rabbitmq",
    ) -> None:
        require("rabbitmq")
        if exchange_type not in _EXCHANGE_TYPES:
            raise ConfigurationError(
                f"rabbitmq exchange_type must be one of {', '.join(_EXCHANGE_TYPES)}"
            )
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigurationError("rabbitmq chunk must be a whole number of at least 1")
        self.url = url
        self.exchange_name = exchange
        self.routing_key = Template(routing_key, escape=routing_escape)
        self.declare_exchange = declare_exchange and exchange != ""
        self.exchange_type = exchange_type
        self.mandatory = mandatory
        self.headers: dict[str, Any] = dict(headers or {})
        self.timeout = timeout
        self.chunk = chunk
        self.name = name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    def __repr__(self) -> str:
        return (
            f"RabbitMQ(exchange={self.exchange_name!r}, routing_key={self.routing_key.pattern!r})"
        )

    async def start(self) -> None:
        """Connect, open a confirming channel and declare (or check) the exchange."""
        import aio_pika
        import aio_pika.exceptions
        import aiormq.exceptions

        if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
            return
        await self._drop()
        try:
            # A plain connection, not connect_robust: a broken connection must
            # fail the send, so that walex resends what was not confirmed.
            connection = await aio_pika.connect(self.url, timeout=self.timeout)
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
            raise DestinationError(
                f"cannot connect: {type(exc).__name__}: {exc}", destination=self.name
            ) from exc
        self._connection = connection
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            self._channel = channel
            if self.exchange_name == "":
                self._exchange = channel.default_exchange
            elif self.declare_exchange:
                self._exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType(self.exchange_type), durable=True
                )
            else:
                self._exchange = await channel.get_exchange(self.exchange_name, ensure=True)
        except aiormq.exceptions.ChannelClosed as exc:
            await self._drop()
            # The broker refused the exchange (missing, or declared otherwise).
            raise DestinationError(
                f"exchange {self.exchange_name!r}: {exc}", destination=self.name, retryable=False
            ) from exc
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
            await self._drop()
            raise DestinationError(
                f"cannot open a channel: {type(exc).__name__}: {exc}", destination=self.name
            ) from exc

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None:
            # A broken connection may fail to close: it is gone either way.
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        """Close the connection."""
        await self._drop()

    async def send(self, events: Sequence[Event]) -> None:
        """Publish every event in order; return when the broker confirmed them all."""
        import aio_pika
        from pamqp.commands import Basic

        await self.start()
        exchange = self._exchange
        assert exchange is not None
        render = self.routing_key.render
        for i in range(0, len(events), self.chunk):
            chunk = events[i : i + self.chunk]
            keys = [render(e) for e in chunk]
            publishes = [
                asyncio.ensure_future(
                    exchange.publish(
                        aio_pika.Message(
                            dumpb(event),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=event.id,
                            content_type="application/json",
                            headers=self.headers or None,
                        ),
                        routing_key=key,
                        mandatory=self.mandatory,
                    )
                )
                for event, key in zip(chunk, keys, strict=True)
            ]
            try:
                async with asyncio.timeout(self.timeout):
                    results: list[Any] = await asyncio.gather(*publishes, return_exceptions=True)
            except TimeoutError as exc:
                for p in publishes:
                    p.cancel()
                acked = _acked([p.result() if _ok(p) else None for p in publishes])
                await self._drop()
                raise DestinationError(
                    f"no confirm within {self.timeout}s",
                    destination=self.name,
                    failed=events[i + acked :],
                ) from exc
            for k, result in enumerate(results):
                if isinstance(result, Basic.Ack):
                    continue
                failed = events[i + k :]
                if isinstance(result, BaseException):
                    # A broken connection or channel, or a nack (the broker
                    # could not take the message): another try may succeed.
                    await self._drop()
                    raise DestinationError(
                        f"publish to {keys[k]!r} failed: {type(result).__name__}: {result}",
                        destination=self.name,
                        failed=failed,
                    ) from result
                # A returned message: no queue is bound for its routing key.
                raise DestinationError(
                    f"no queue receives routing key {keys[k]!r} on exchange "
                    f"{self.exchange_name!r} (bind one, or set mandatory = false)",
                    destination=self.name,
                    retryable=False,
                    failed=failed,
                    rejected=failed[:1],
                )


def _ok(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _acked(results: list[Any]) -> int:
    from pamqp.commands import Basic

    n = 0
    for result in results:
        if not isinstance(result, Basic.Ack):
            break
        n += 1
    return n

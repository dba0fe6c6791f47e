"""Destinations: deliver changes to other systems, at least once.

This package owns talking to each broker; routing, retries and error policies
are :mod:`walex.routing`'s, and a destination must not confirm anything
itself.

A destination takes batches of events and returns only once the receiving
system has durably accepted them. walex confirms a transaction to Postgres
only after every destination it goes to has accepted it, so a crash, a kill
or a broken broker connection replays changes, never loses them. Every event
carries its idempotency key (:attr:`walex.Event.id`) to the receiving side,
in the form that side understands (``Nats-Msg-Id``, ``message_id``,
``webhook-id``, an ``id`` field), so that consumers can drop the replays.

==========  ==============================================  ==================
name        class                                           extra
==========  ==============================================  ==================
webhook     :class:`~walex.destinations.webhook.Webhook`    ``walex[webhook]``
redis       :class:`~walex.destinations.redis.RedisStreams` ``walex[redis]``
nats        :class:`~walex.destinations.nats.JetStream`     ``walex[nats]``
rabbitmq    :class:`~walex.destinations.rabbitmq.RabbitMQ`  ``walex[rabbitmq]``
mqtt        :class:`~walex.destinations.mqtt.MQTT`          ``walex[mqtt]``
file        :class:`~walex.destinations.file.JsonLines`     (none)
==========  ==============================================  ==================

Any object with ``name``, ``start``, ``send`` and ``close`` is a destination
(:class:`Destination`); see ``examples/destinations/custom.py``.

Example::

    from walex.destinations import deliver
    from walex.destinations.nats import JetStream

    async with walex.connect(dsn, publication="app", slot="to_nats", durable=True) as stream:
        await deliver(stream, [JetStream(subject="cdc.{table}.{pk}", stream="CDC")])
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigurationError
from ._base import EXTRAS, Destination, DestinationError, Template, require
from ._runner import Deliverer, RetryPolicy, Route, deliver, send_with_retry

__all__ = [
    "EXTRAS",
    "Deliverer",
    "Destination",
    "DestinationError",
    "RetryPolicy",
    "Route",
    "Template",
    "deliver",
    "from_config",
    "require",
    "send_with_retry",
]


# -- configuration --------------------------------------------------------

_CLASSES = {
    "webhook": "walex.destinations.webhook:Webhook",
    "redis": "walex.destinations.redis:RedisStreams",
    "nats": "walex.destinations.nats:JetStream",
    "rabbitmq": "walex.destinations.rabbitmq:RabbitMQ",
    "mqtt": "walex.destinations.mqtt:MQTT",
    "file": "walex.destinations.file:JsonLines",
}


def _load_class(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"class = {path!r}: write it as 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"class = {path!r}: cannot import {module_name}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigurationError(f"class = {path!r}: {module_name} has no {attr}") from None


def from_config(section: Mapping[str, Any]) -> Destination:
    """Make a destination from one ``[[destinations]]`` section of a TOML file.

    ``type`` picks the destination (``webhook``, ``redis``, ``nats``,
    ``rabbitmq``, ``mqtt``, ``file``); ``class = "package.module:Class"``
    makes a custom one instead. Every other key is passed to the class as a
    keyword argument. The app's own keys (``tables``, ``types``,
    ``on_error``, ``retries``) are taken out before this is called.

    Raises:
        ConfigurationError: an unknown type or key, a bad value, or a client
            library that is not installed (with its ``pip install`` line).

    Example::

        from_config({"type": "nats", "subject": "cdc.{table}.{pk}", "stream": "CDC"})
    """
    options = dict(section)
    kind = options.pop("type", None)
    path = options.pop("class", None)
    if (kind is None) == (path is None):
        raise ConfigurationError(
            "a destination needs either type = one of "
            + ", ".join(repr(k) for k in _CLASSES)
            + " or class = 'package.module:ClassName'"
        )
    if kind is not None:
        if kind not in _CLASSES:
            raise ConfigurationError(
                f"unknown destination type {kind!r}; use one of "
                + ", ".join(repr(k) for k in _CLASSES)
            )
        if kind in EXTRAS:
            require(kind)
        cls = _load_class(_CLASSES[kind])
        label = f"destination type = {kind!r}"
    else:
        if not isinstance(path, str):
            raise ConfigurationError("class must be a string: 'package.module:ClassName'")
        cls = _load_class(path)
        label = f"destination class = {path!r}"
        missing = [m for m in ("start", "send", "close") if not callable(getattr(cls, m, None))]
        if missing:
            raise ConfigurationError(
                f"{label} is not a destination: it has no {', '.join(missing)} "
                "(see walex.destinations.Destination)"
            )
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = {
            name
            for name, p in params.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigurationError(
                f"{label}: unknown option(s) {', '.join(unknown)}; it takes "
                + ", ".join(sorted(accepted))
            )
    try:
        destination = cls(**options)
    except ConfigurationError:
        raise
    except TypeError as exc:
        raise ConfigurationError(f"{label}: {exc}") from exc
    if not isinstance(destination, Destination):
        raise ConfigurationError(
            f"{label}: {cls!r} is not a destination (it needs name, start, send and close)"
        )
    return destination

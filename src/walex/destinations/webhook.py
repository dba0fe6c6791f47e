"""Webhook: POST events to an HTTP endpoint, signed the Standard Webhooks way.

It owns the HTTP client and the signatures; routing and retries are
:mod:`walex.routing`'s.

Each request carries the three Standard Webhooks headers
(https://www.standardwebhooks.com):

- ``webhook-id``: the event's id (``"<commit LSN>:<seq>"``), or for a batch
  ``"<first id>..<last id>"``: the same when the request is sent again;
- ``webhook-timestamp``: seconds since the epoch when it was sent;
- ``webhook-signature``: ``"v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))``
  where *key* is the secret after its ``whsec_`` prefix, base64-decoded.

Answers: 2xx delivers; 408, 429 and 5xx are tried again (after the
``Retry-After`` the server asks for, else with backoff); any other answer
refuses the event for good: the route's error policy takes it (``stop``,
``skip`` or ``dead_letter``). Network errors and timeouts are tried again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ..events import Event
from ..wire import dumpb
from ._base import DestinationError, require

if TYPE_CHECKING:
    import httpx

__all__ = ["Webhook", "decode_secret", "sign"]

_RETRY_STATUS = frozenset({408, 429})


def decode_secret(secret: str) -> bytes:
    """The signing key from a Standard Webhooks secret: ``whsec_`` + base64.

    Raises:
        ConfigurationError: the secret is not base64 (with or without the prefix).
    """
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ConfigurationError(
            "webhook secret must be 'whsec_' + base64 of random bytes (Standard Webhooks); "
            'make one with: python -c "import base64, os; '
            "print('whsec_' + base64.b64encode(os.urandom(24)).decode())\""
        )
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one request."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class Webhook:
    """POST events to *url*, one per request or in batches.

    Args:
        url: the endpoint.
        secret: the Standard Webhooks secret (``whsec_...``) to sign with;
            ``None`` sends no signature.
        secret_env: the name of an environment variable holding the secret,
            to keep it out of configuration files.
        batch: send up to *batch_size* events per request, as
            ``{"events": [...]}``; ``False`` (default) sends each event as
            its own request, the body being the event.
        batch_size: the most events in one request.
        timeout: seconds for each request (connect, write, read).
        headers: more headers for every request (``Authorization``, ...).
        verify: TLS certificate checking, as httpx takes it.
        name: the name in logs.

    Raises:
        ConfigurationError: httpx is missing (``pip install "walex[webhook]"``),
            or a setting is wrong.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        secret_env: str | None = None,
        batch: bool = False,
        batch_size: int = 100,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        verify: bool | str = True,
        name: str = "webhook",
    ) -> None:
        require("webhook")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"webhook url must start with http:// or https://: {url!r}")
        if secret_env is not None:
            if secret is not None:
                raise ConfigurationError("webhook: give secret or secret_env, not both")
            secret = os.environ.get(secret_env)
            if not secret:
                raise ConfigurationError(f"webhook: the environment variable {secret_env} is empty")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError("webhook batch_size must be a whole number of at least 1")
        if not timeout > 0:
            raise ConfigurationError("webhook timeout must be a positive number of seconds")
        self.url = url
        self.name = name
        self.batch = bool(batch)
        self.batch_size = batch_size
        self.timeout = float(timeout)
        self._key = decode_secret(secret) if secret is not None else None
        self._headers = dict(headers or {})
        self._verify = verify
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"Webhook({self.url!r}, batch={self.batch})"

    async def start(self) -> None:
        """Make the HTTP client (connections open on first use)."""
        import httpx

        from .._version import __version__

        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                headers={"user-agent": f"walex/{__version__}", **self._headers},
                verify=self._verify,
                follow_redirects=False,
            )

    async def close(self) -> None:
        """Close the HTTP client."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, events: Sequence[Event]) -> None:
        """POST the events in order; return when every request got a 2xx."""
        if self._client is None:
            await self.start()
        if not self.batch:
            for i, event in enumerate(events):
                await self._post(event.id, dumpb(event), events, i, 1)
            return
        for i in range(0, len(events), self.batch_size):
            chunk = events[i : i + self.batch_size]
            body = b'{"events":[' + b",".join([dumpb(e) for e in chunk]) + b"]}"
            msg_id = chunk[0].id if len(chunk) == 1 else f"{chunk[0].id}..{chunk[-1].id}"
            await self._post(msg_id, body, events, i, len(chunk))

    async def _post(
        self, msg_id: str, body: bytes, events: Sequence[Event], start: int, count: int
    ) -> None:
        import httpx

        client = self._client
        assert client is not None
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, msg_id, timestamp, body)
        failed = events[start:]
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DestinationError(
                f"POST {self.url} failed: {type(exc).__name__}: {exc}",
                destination=self.name,
                failed=failed,
            ) from exc
        status = response.status_code
        if 200 <= status < 300:
            return
        text = _excerpt(response)
        retryable = status >= 500 or status in _RETRY_STATUS
        raise DestinationError(
            f"POST {self.url} answered {status}{text}",
            destination=self.name,
            retryable=retryable,
            retry_after=_retry_after(response.headers.get("retry-after")) if retryable else None,
            failed=failed,
            rejected=None if retryable else events[start : start + count],
        )


def _excerpt(response: Any) -> str:
    text: str = response.text[:200].strip()
    return f": {text}" if text else ""

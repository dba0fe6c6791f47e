"""The webhook destination against a local HTTP server that checks Standard
Webhooks signatures and answers with the failures a test asks for."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import walex
from tests.fix_pg import Database
from tests.fix_services import make_events
from walex.destinations import Deliverer, DestinationError, RetryPolicy, Route, from_config
from walex.destinations.file import JsonLines
from walex.destinations.webhook import Webhook, decode_secret, sign

SECRET = "whsec_" + base64.b64encode(b"walex test secret, 24 b!").decode()
FAST = RetryPolicy(initial=0.01, maximum=0.05)


@dataclass
class Receiver:
    """What the server got, and what it should answer next."""

    key: bytes
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    # Answers for the next requests: (status, headers, seconds to stall).
    script: list[tuple[int, dict[str, str], float]] = field(default_factory=list)
    # Status for any request whose body contains this text.
    refuse: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def accepted(self) -> list[dict[str, Any]]:
        """Events of the requests answered 2xx, in order."""
        out: list[dict[str, Any]] = []
        for headers, body in self.received:
            if headers.get("x-answer", "200").startswith("2"):
                doc = json.loads(body)
                out.extend(doc.get("events", [doc]))
        return out


def _verify(key: bytes, headers: dict[str, str], body: bytes) -> str | None:
    """The Standard Webhooks check a receiver makes; the reason it fails, or None."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    given = headers.get("webhook-signature", "")
    if not msg_id or not stamp:
        return "missing webhook-id or webhook-timestamp"
    if abs(time.time() - int(stamp)) > 300:
        return "timestamp too far from now"
    expected = base64.b64encode(
        hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    signatures = [s.split(",", 1)[1] for s in given.split() if s.startswith("v1,")]
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        return f"bad signature for {msg_id}"
    return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(key=decode_secret(SECRET))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            problem = _verify(state.key, headers, body)
            with state.lock:
                status, extra, stall = state.script.pop(0) if state.script else (200, {}, 0.0)
                for text, code in state.refuse.items():
                    if text in body.decode():
                        status = code
                if problem is not None:
                    state.bad_signatures.append(problem)
                    status = 401
                headers["x-answer"] = str(status)
                state.received.append((headers, body))
            if stall:
                time.sleep(stall)
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_every_change_is_posted_signed_in_order(cdc_db: Database, receiver: Receiver) -> None:
    pub = cdc_db.unique("pub")
    cdc_db.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE t")
    dest = from_config({"type": "webhook", "url": receiver.url, "secret": SECRET})
    async with walex.connect(cdc_db.dsn, publication=pub) as stream:
        with cdc_db.connect() as conn:
            for i in range(1, 6):
                conn.execute("INSERT INTO t VALUES (%s, 'x')", (i,))
            conn.execute("UPDATE t SET v = 'y' WHERE id = 3")
        seen = 0
        async with Deliverer([dest]) as deliverer, asyncio.timeout(20):
            async for batch in stream:
                await deliverer.handle(batch)
                seen += len(batch)
                if seen == 6:
                    break
    assert receiver.bad_signatures == []
    events = receiver.accepted()
    assert [(e["type"], e["new_record"]["id"]) for e in events] == [
        *[("insert", i) for i in range(1, 6)],
        ("update", 3),
    ]
    for (headers, _), event in zip(receiver.received, events, strict=True):
        assert headers["webhook-id"] == event["id"]
        assert headers["content-type"] == "application/json"


async def test_batches_are_one_signed_request(receiver: Receiver) -> None:
    events = make_events(5)
    dest = Webhook(receiver.url, secret=SECRET, batch=True, batch_size=2)
    async with Deliverer([dest]) as deliverer:
        await deliverer.handle(events)
    assert receiver.bad_signatures == []
    assert [h["webhook-id"] for h, _ in receiver.received] == [
        f"{events[0].id}..{events[1].id}",
        f"{events[2].id}..{events[3].id}",
        events[4].id,
    ]
    assert [e["id"] for e in receiver.accepted()] == [e.id for e in events]


async def test_5xx_and_429_are_retried_honouring_retry_after(receiver: Receiver) -> None:
    receiver.script = [(503, {}, 0.0), (429, {"Retry-After": "1"}, 0.0)]
    (event,) = make_events(1)
    dest = Webhook(receiver.url, secret=SECRET)
    loop = asyncio.get_running_loop()
    async with Deliverer([Route(dest, policy=FAST)]) as deliverer:
        started = loop.time()
        await deliverer.handle([event])
        took = loop.time() - started
    assert [h["x-answer"] for h, _ in receiver.received] == ["503", "429", "200"]
    # The same id on every try, so the receiver can drop what it already has.
    assert {h["webhook-id"] for h, _ in receiver.received} == {event.id}
    assert took >= 1.0, "Retry-After: 1 was not honoured"
    assert receiver.bad_signatures == []


async def test_timeouts_are_retried(receiver: Receiver) -> None:
    receiver.script = [(200, {}, 1.0)]  # answers after the client gave up
    dest = Webhook(receiver.url, secret=SECRET, timeout=0.3)
    async with Deliverer([Route(dest, policy=FAST)]) as deliverer:
        await deliverer.handle(make_events(1))
    assert len(receiver.received) == 2


async def test_other_4xx_is_not_retried_and_goes_to_the_dead_letter(
    receiver: Receiver, tmp_path: Path
) -> None:
    events = make_events(3)
    receiver.refuse = {events[1].id: 422}
    dead = JsonLines(tmp_path / "dead.jsonl", name="dead-letter")
    route = Route(
        Webhook(receiver.url, secret=SECRET),
        on_error="dead_letter",
        dead_letter=dead,
        policy=FAST,
    )
    async with Deliverer([route]) as deliverer:
        await deliverer.handle(events)
    answers = [(h["webhook-id"], h["x-answer"]) for h, _ in receiver.received]
    assert answers == [(events[0].id, "200"), (events[1].id, "422"), (events[2].id, "200")]
    dead_ids = [json.loads(line)["id"] for line in (tmp_path / "dead.jsonl").read_text().split()]
    assert dead_ids == [events[1].id]


async def test_4xx_stops_by_default(receiver: Receiver) -> None:
    receiver.script = [(400, {}, 0.0)]
    async with Deliverer([Webhook(receiver.url, secret=SECRET)]) as deliverer:
        with pytest.raises(DestinationError, match="answered 400") as info:
            await deliverer.handle(make_events(1))
    assert not info.value.retryable
    assert len(receiver.received) == 1


async def test_unsigned_when_no_secret(receiver: Receiver) -> None:
    dest = Webhook(receiver.url, headers={"authorization": "Bearer t"})
    await dest.start()
    with pytest.raises(DestinationError, match="answered 401"):
        await dest.send(make_events(1))
    await dest.close()
    headers, _ = receiver.received[0]
    assert "webhook-signature" not in headers
    assert headers["authorization"] == "Bearer t"


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    dest = from_config({"type": "webhook", "url": "https://x.invalid", "secret_env": "HOOK_SECRET"})
    assert isinstance(dest, Webhook)
    monkeypatch.delenv("HOOK_SECRET")
    with pytest.raises(ValueError, match="HOOK_SECRET is empty"):
        Webhook("https://x.invalid", secret_env="HOOK_SECRET")

"""Every broker destination against the real broker: complete, in order, at least once.

Each test runs once per broker (Redis Streams, NATS JetStream, RabbitMQ,
MQTT), on one Postgres version (``cdc_db``): what a destination does with
events does not depend on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import walex
from tests.fix_pg import Database
from tests.fix_services import (
    TcpProxy,
    Workload,
    check_complete_in_order,
    first_copies,
    make_events,
    make_item_table,
    proxied,
    received_until,
    require_service,
    sink,
    target_of,
)
from walex.destinations import Deliverer, DestinationError, RetryPolicy, Route, from_config
from walex.lsn import LSN

ROOT = Path(__file__).resolve().parents[2]
BROKERS = ["redis", "nats", "rabbitmq", "mqtt"]


@pytest.mark.parametrize("kind", BROKERS)
async def test_every_change_arrives_in_order_per_key(cdc_db: Database, kind: str) -> None:
    pub, _ = make_item_table(cdc_db)
    async with sink(kind) as snk:
        dest = from_config(snk.config())
        await dest.start()
        try:
            async with walex.connect(cdc_db.dsn, publication=pub, max_batch_events=10) as stream:
                work = Workload(cdc_db, transactions=40).start()
                async with asyncio.timeout(30):
                    async for batch in stream:
                        # The batch is confirmed only once the broker has it.
                        await dest.send(batch.events)
                        if any(e.new_record and e.new_record["id"] == -1 for e in batch.events):
                            break
                work.join()
        finally:
            await dest.close()
        received = await received_until(snk, work.events)
    check_complete_in_order(received, work.events)
    # Nothing was lost or repeated, so nothing came twice either.
    assert len(received) == work.events


@pytest.mark.parametrize("kind", BROKERS)
async def test_broken_connection_retries_and_holds_position(cdc_db: Database, kind: str) -> None:
    pub, slot = make_item_table(cdc_db)
    async with sink(kind) as snk:
        with TcpProxy(*target_of(snk.url)) as proxy:
            dest = from_config(snk.config(proxied(snk.url, proxy)))
            route = Route(dest, retries=None, policy=RetryPolicy(initial=0.05, maximum=0.3))
            async with (
                walex.connect(
                    cdc_db.dsn, publication=pub, slot=slot, durable=True, max_batch_events=5
                ) as stream,
                Deliverer([route]) as deliverer,
            ):
                work = Workload(cdc_db, transactions=60, pause=0.01).start()
                samples: list[tuple[LSN, set[str]]] = []

                async def cut_mid_stream() -> None:
                    while route.delivered < 60:  # noqa: ASYNC110 - a counter, not an event
                        await asyncio.sleep(0.01)
                    proxy.cut(refuse_for=1.0)
                    for _ in range(3):
                        await asyncio.sleep(0.3)
                        # What the slot holds as confirmed, then what the broker has.
                        confirmed = stream.confirmed_lsn
                        have = {e["id"] for e in await snk.received()}
                        samples.append((confirmed, have))

                cutter = asyncio.ensure_future(cut_mid_stream())
                async with asyncio.timeout(60):
                    async for batch in stream:
                        await deliverer.handle(batch)
                        if any(e.new_record and e.new_record["id"] == -1 for e in batch.events):
                            break
                await cutter
                work.join()
            assert proxy.accepted >= 2, "the destination never reconnected"
            received = await received_until(snk, work.events)
    check_complete_in_order(received, work.events)
    unique = first_copies(received)
    # While the broker was out of reach, the slot confirmed nothing the broker lacked.
    for confirmed, have in samples:
        missing = [e["id"] for e in unique if LSN.parse(e["commit_lsn"]) < confirmed]
        assert set(missing) <= have, f"confirmed {confirmed} before the broker had it"


@pytest.mark.parametrize("kind", BROKERS)
def test_kill_9_and_restart_loses_nothing(cdc_db: Database, kind: str) -> None:
    asyncio.run(_kill_9_and_restart(cdc_db, kind))


async def _kill_9_and_restart(db: Database, kind: str) -> None:
    pub, slot = make_item_table(db)
    async with sink(kind) as snk:
        cmd = [
            sys.executable,
            "-m",
            "tests.fix_services",
            db.dsn,
            pub,
            slot,
            json.dumps(snk.config()),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}

        def spawn() -> subprocess.Popen[str]:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            return proc

        proc = await asyncio.to_thread(spawn)
        work = Workload(db, transactions=150, pause=0.01).start()
        rng = random.Random(f"kill-{kind}")
        killed_while_writing = 0
        try:
            for _ in range(3):
                await asyncio.sleep(rng.uniform(0.2, 0.6))
                killed_while_writing += not work.done.is_set()
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                assert proc.stdout is not None
                proc.stdout.close()
                proc = await asyncio.to_thread(spawn)
            await asyncio.to_thread(work.join)
            received = await received_until(snk, work.events, wait=60)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
    assert killed_while_writing, "every kill came after the last change: not mid-stream"
    check_complete_in_order(received, work.events)
    if kind == "nats":
        # Replays carry the same Nats-Msg-Id: JetStream dropped every one.
        assert len(received) == work.events


# -- what each broker adds ------------------------------------------------


async def test_jetstream_drops_replays_by_msg_id() -> None:
    async with sink("nats") as snk:
        dest = from_config(snk.config())
        events = make_events(5)
        await dest.start()
        try:
            await dest.send(events)
            await dest.send(events[2:])  # a replay after a crash
        finally:
            await dest.close()
        received = await snk.received()
    assert [e["id"] for e in received] == [e.id for e in events]


async def test_jetstream_without_a_stream_is_an_error_not_a_loss() -> None:
    require_service("nats")
    async with sink("nats") as snk:
        # No stream listens on this subject: JetStream cannot take the message.
        dest = from_config({**snk.config(), "create_stream": False, "stream": None})
        await dest.start()
        try:
            with pytest.raises(DestinationError) as info:
                await dest.send(make_events(1))
        finally:
            await dest.close()
    assert info.value.failed is not None
    assert len(info.value.failed) == 1


async def test_jetstream_unreachable_at_start_fails_in_one_line_within_its_timeout() -> None:
    """nats-py's connect keeps knocking at a server that is not there; the
    destination gives up within its timeout, as the other brokers do."""
    pytest.importorskip("nats")
    from walex.destinations.nats import JetStream

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = JetStream(servers=f"nats://127.0.0.1:{port}", subject="x.{table}", timeout=2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(DestinationError, match="ConnectionRefusedError") as info:
        await asyncio.wait_for(dest.start(), 10)
    await dest.close()
    assert info.value.retryable
    assert f"cannot connect to nats://127.0.0.1:{port}" in str(info.value)
    assert loop.time() - started < 3

    # A server that accepts the connection and never speaks: the timeout bounds it.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dest = JetStream(servers=f"nats://127.0.0.1:{port}", subject="x.{table}", timeout=1)
    started = loop.time()
    async with server:
        with pytest.raises(DestinationError, match="cannot connect"):
            await asyncio.wait_for(dest.start(), 10)
        await dest.close()
    assert loop.time() - started < 3


async def test_jetstream_without_a_stream_for_the_subject_says_how_to_make_one() -> None:
    require_service("nats")
    from walex.destinations.nats import JetStream

    subject = f"walexnostream{secrets.token_hex(4)}.{{table}}"
    dest = JetStream(subject=subject, timeout=2)
    await dest.start()
    try:
        with pytest.raises(DestinationError) as info:
            await dest.send(make_events(2))
    finally:
        await dest.close()
    message = str(info.value)
    assert "no JetStream stream stores subject" in message
    assert "nats stream add CDC --subjects 'walexnostream" in message
    assert ".>'" in message
    assert info.value.retryable  # someone may create it: walex tries again


async def test_redis_maxlen_caps_the_stream() -> None:
    async with sink("redis") as snk:
        dest = from_config(snk.config(maxlen=10, exact_maxlen=True))
        await dest.start()
        try:
            await dest.send(make_events(25))
        finally:
            await dest.close()
        received = await snk.received()
    assert [e["new_record"]["id"] for e in received] == list(range(16, 26))


async def test_rabbitmq_unroutable_message_is_refused_not_dropped() -> None:
    async with sink("rabbitmq") as snk:
        # An exchange no queue is bound to.
        dest = from_config({**snk.config(), "exchange": f"{snk.tag}_nobody"})
        await dest.start()
        try:
            with pytest.raises(DestinationError, match="no queue receives") as info:
                await dest.send(make_events(2))
        finally:
            await dest.close()
            channel = await snk.conn.channel()  # type: ignore[attr-defined]
            await channel.exchange_delete(f"{snk.tag}_nobody")
    assert not info.value.retryable
    assert info.value.rejected is not None
    assert [e.seq for e in info.value.rejected] == [0]


def test_an_absent_service_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WALEX_TEST_REDIS", f"redis://127.0.0.1:{port}/0")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis is not running"):
        require_service("redis")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_service("redis")

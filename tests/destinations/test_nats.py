"""NATS JetStream killed and restarted mid-stream, with its file storage: nothing
that walex confirmed to Postgres was missing from what JetStream had stored.

A private nats-server (the machine's binary, on a free port of 127.0.0.1,
with a store directory of its own) is killed with SIGKILL while walex
delivers to it with several batches in flight (pipelined ``deliver``), then
started again on the same store.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import walex
from tests.fix_pg import Database
from tests.fix_services import Workload, check_complete_in_order, make_item_table
from walex.destinations import RetryPolicy, Route, deliver
from walex.lsn import LSN

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
STREAM = "KILLED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server process with JetStream on file storage in *store*."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _stored(url: str) -> list[dict[str, Any]]:
    """Every event the stream holds, in its order."""
    import json

    import nats

    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        out: list[dict[str, Any]] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(STREAM, seq)
            assert message.data is not None
            out.append(json.loads(message.data))
        return out
    finally:
        await nc.close()


async def test_a_broker_killed_mid_stream_loses_nothing_walex_confirmed(
    db: Database, nats_server: NatsServer
) -> None:
    pytest.importorskip("nats")
    from walex.destinations.nats import JetStream

    pub, slot = make_item_table(db)
    dest = JetStream(
        servers=nats_server.url,
        subject="killed.{table}",
        stream=STREAM,
        create_stream=True,
        stream_subjects=["killed.>"],
        timeout=2,
    )
    # Slow retries: the stream's content is read back before walex sends again.
    route = Route(dest, retries=None, policy=RetryPolicy(initial=2.0, maximum=2.0))
    stop = asyncio.Event()
    async with walex.connect(
        db.dsn, publication=pub, slot=slot, durable=True, max_batch_events=5, status_interval=0.1
    ) as stream:
        delivering = asyncio.ensure_future(deliver(stream, [route], stop=stop, window_events=40))
        work = Workload(db, transactions=150, pause=0.005).start()
        while route.delivered < 100:  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.01)
        nats_server.kill()
        # While the broker is down, what the slot confirms must not move past it.
        confirmed_while_down: list[LSN] = []
        for _ in range(5):
            await asyncio.sleep(0.1)
            confirmed_while_down.append(stream.confirmed_lsn)
        nats_server.start()
        stored_at_restart = await _stored(nats_server.url)
        await asyncio.to_thread(work.join)
        async with asyncio.timeout(60):
            while len({e["id"] for e in await _stored(nats_server.url)}) < work.events:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        stop.set()
        await delivering
    stored_ids = {e["id"] for e in stored_at_restart}
    # Every event confirmed to Postgres by the time of the kill was in JetStream's store.
    latest = max(confirmed_while_down)
    assert latest > 0
    # The events a confirmation covered are the ones with a commit LSN below it.
    final = await _stored(nats_server.url)
    covered = [e["id"] for e in final if LSN.parse(e["commit_lsn"]) < latest]
    assert covered, "nothing was confirmed before the kill: the test proves nothing"
    missing = [i for i in covered if i not in stored_ids]
    assert missing == [], f"confirmed {latest} while JetStream had not stored {missing[:5]}"
    check_complete_in_order(final, work.events)
    # Replays carry the same Nats-Msg-Id: JetStream kept one copy of each.
    assert len(final) == work.events

"""walex as a config-only CDC service: ``walex run --config walex.toml`` with
``[[destinations]]`` sections, end to end against real brokers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.fix_pg import Database
from tests.fix_services import sink
from walex.destinations import Destination, from_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "destinations" / "walex.toml"
APP_KEYS = {"tables", "types", "on_error", "retries"}


def test_example_config_builds_every_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_WEBHOOK_SECRET", "whsec_dGVzdHRlc3R0ZXN0dGVzdA==")
    config = tomllib.loads(EXAMPLE.read_text())
    kinds = []
    for section in config["destinations"]:
        dest = from_config({k: v for k, v in section.items() if k not in APP_KEYS})
        assert isinstance(dest, Destination)
        kinds.append(section["type"])
    assert kinds == ["nats", "redis", "webhook", "file"]


async def test_walex_run_config_delivers_to_each_destination(
    cdc_db: Database, tmp_path: Path
) -> None:
    pub = cdc_db.unique("pub")
    cdc_db.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
    cdc_db.execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
    cdc_db.execute(f"CREATE PUBLICATION {pub} FOR TABLE orders, customers")
    out = tmp_path / "changes.jsonl"
    async with sink("nats") as nats_sink, sink("redis") as redis_sink:
        nats_cfg = nats_sink.config()
        redis_cfg = redis_sink.config()
        config = tmp_path / "walex.toml"
        config.write_text(
            f"""
name = "{cdc_db.unique("svc")}"
publication = "{pub}"
retries = 5

[[destinations]]
type = "nats"
servers = "{nats_cfg["servers"]}"
subject = "{nats_cfg["subject"]}"
stream = "{nats_cfg["stream"]}"
create_stream = true

[[destinations]]
type = "redis"
url = "{redis_cfg["url"]}"
stream = "{redis_cfg["stream"]}"
tables = ["orders"]

[[destinations]]
type = "file"
path = "{out}"
fsync = true
types = ["insert"]
"""
        )
        env = {**os.environ, "WALEX_URL": cdc_db.dsn, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "walex", "run", "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        async def failure() -> str:
            assert proc.stderr is not None
            return (await proc.stderr.read()).decode()

        try:
            # Wait for the slot, then write.
            deadline = time.monotonic() + 30
            while not cdc_db.fetch("SELECT 1 FROM pg_replication_slots WHERE active"):
                assert proc.returncode is None, await failure()
                assert time.monotonic() < deadline, "walex run never opened its slot"
                await asyncio.sleep(0.1)
            with cdc_db.connect() as conn:
                conn.execute("INSERT INTO orders VALUES (1, 9.90), (2, 20)")
                conn.execute("INSERT INTO customers VALUES (7, 'ann')")
                conn.execute("UPDATE orders SET total = 10 WHERE id = 1")
            deadline = time.monotonic() + 30
            while len(await nats_sink.received()) < 4:
                assert proc.returncode is None, await failure()
                assert time.monotonic() < deadline, "the changes never reached NATS"
                await asyncio.sleep(0.2)
            redis_events = await redis_sink.received()
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        nats_events = await nats_sink.received()
    assert [(e["table"], e["type"]) for e in nats_events] == [
        ("orders", "insert"),
        ("orders", "insert"),
        ("customers", "insert"),
        ("orders", "update"),
    ]
    assert [(e["table"], e["type"]) for e in redis_events] == [
        ("orders", "insert"),
        ("orders", "insert"),
        ("orders", "update"),
    ]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["table"], e["new_record"]["id"]) for e in lines] == [
        ("orders", 1),
        ("orders", 2),
        ("customers", 7),
    ]
    assert [e["id"] for e in lines] == [e["id"] for e in nats_events[:3]]

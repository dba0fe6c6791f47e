"""Helpers for tests that read a walex stream: never wait forever."""

from __future__ import annotations

import asyncio

import walex


async def collect(stream: walex.Stream, count: int, timeout: float = 20.0) -> list[walex.Event]:
    """Read batches until *count* events have arrived; fail after *timeout* seconds.

    Stops at the end of the batch that completes the count (the batch counts
    as handled only when the next is asked for or the stream is closed).
    """
    events: list[walex.Event] = []
    async with asyncio.timeout(timeout):
        async for batch in stream:
            events.extend(batch.events)
            if len(events) >= count:
                break
    return events


async def collect_batches(
    stream: walex.Stream, count: int, timeout: float = 20.0
) -> list[walex.Batch]:
    """Read *count* batches; fail after *timeout* seconds."""
    batches: list[walex.Batch] = []
    async with asyncio.timeout(timeout):
        async for batch in stream:
            batches.append(batch)
            if len(batches) >= count:
                break
    return batches


def setup_table(db: object, ddl: str, publication: str, table: str) -> None:
    """Create a table and a publication for it."""
    execute = db.execute  # type: ignore[attr-defined]
    execute(ddl)
    execute(f'CREATE PUBLICATION "{publication}" FOR TABLE {table}')

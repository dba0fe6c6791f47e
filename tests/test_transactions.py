"""walex.transactions: frames → batches, from frames a real server sent, no server needed.

The corpus (tests/data/pgoutput-<major>.jsonl.gz, see make_corpus.py) holds
the same workload decoded five ways: text, binary, protocol 1, streamed
in-progress transactions and two-phase. Whatever the way, the assembler must
hand on the same changes in the same order.
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.string import TextBinaryLoader, TextLoader

import walex.transactions
from walex.errors import DecodeError
from walex.events import Batch, Event
from walex.lsn import LSN
from walex.pgoutput.messages import Relation
from walex.transactions import HEARTBEAT_PREFIX, Assembler
from walex.values import RelationCodec, make_adapters, make_source

DATA = Path(__file__).parent / "data"
MAJORS = (15, 16)
_XLOG = struct.Struct(">cQQq")
_ADAPTERS = make_adapters()
_FIRST_USER_OID = 16384


@functools.cache
def corpus(major: int, run: str) -> list[tuple[int, bytes]]:
    """The (LSN, pgoutput message) pairs of one run of the corpus."""
    with gzip.open(DATA / f"pgoutput-{major}.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    return [(LSN.parse(r["lsn"]), bytes.fromhex(r["hex"])) for r in rows if r["run"] == run]


def frame(lsn: int, payload: bytes, wal_end: int | None = None) -> bytes:
    """An XLogData frame, as the walsender wraps each message."""
    return _XLOG.pack(b"w", lsn, lsn if wal_end is None else wal_end, 0) + payload


def keepalive(wal_end: int, reply: bool = False) -> bytes:
    return struct.pack(">cQq?", b"k", wal_end, 0, reply)


def codec(msg: Relation) -> RelationCodec:
    """What the catalog would make, without a catalog: builtin types by OID, and
    the corpus's one type of its own (an enum) as the catalog registers enums."""
    for column in msg.columns:
        if column.type_oid >= _FIRST_USER_OID:
            _ADAPTERS.register_loader(column.type_oid, TextLoader)
            _ADAPTERS.register_loader(column.type_oid, TextBinaryLoader)
    return RelationCodec(msg, make_source(msg, "corpus", {}, ("id",)), _ADAPTERS)


def drain(asm: Assembler, frames: list[bytes] | None = None) -> Iterator[Batch | int]:
    """Feed *frames*, describe what is asked, and yield everything handed on."""
    if frames:
        asm.frames.extend(frames)
    while True:
        need = asm.step()
        if need is not None:
            asm.add_relation(codec(need))
            continue
        if not asm.ready:
            return
        while asm.ready:
            yield asm.ready.popleft()


def assemble(major: int, run: str, **options: Any) -> list[Batch | int]:
    options.setdefault("max_batch_events", 5000)
    options.setdefault("max_batch_bytes", 64 << 20)
    asm = Assembler(**options)
    try:
        return list(drain(asm, [frame(lsn, msg) for lsn, msg in corpus(major, run)]))
    finally:
        asm.close()


def events_of(items: list[Batch | int]) -> list[Event]:
    return [e for item in items if isinstance(item, Batch) for e in item.events]


def same(event: Event) -> str:
    """What must not depend on how the changes travelled (as text: NaN equals NaN)."""
    return repr(
        (
            event.type,
            event.schema,
            event.table,
            event.new_record,
            event.old_record,
            event.unchanged_toast,
            event.lsn,
            event.seq,
            event.commit_lsn,
            event.prefix,
            event.content,
            event.truncated,
        )
    )


@pytest.fixture(params=MAJORS, ids=lambda m: f"pg{m}")
def major(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def test_the_workload_arrives_as_events(major: int) -> None:
    events = events_of(assemble(major, "text"))
    first = events[0]
    assert first.type == "insert"
    assert first.table == "items"
    assert first.new_record is not None
    assert first.new_record["name"] == "apple"
    assert first.new_record["price"] == Decimal("1.25")
    assert first.new_record["doc"] == {"k": [1, 2]}
    kinds = {e.type for e in events}
    assert kinds == {"insert", "update", "delete", "truncate", "message"}
    truncates = [e for e in events if e.type == "truncate"]
    assert {e.table for e in truncates} == {"items", "full_items"}
    assert all(e.cascade and e.restart_identity for e in truncates)
    plain = [e for e in events if e.type == "message" and not e.transactional]
    assert [(e.prefix, e.content) for e in plain] == [("plain", b"\x00\xff")]
    # A TOASTed value that did not change is named, not invented.
    toasted = [e for e in events if e.unchanged_toast]
    assert toasted
    assert all(c not in (e.new_record or {}) for e in toasted for c in e.unchanged_toast)


def test_seq_counts_each_transaction_from_zero(major: int) -> None:
    by_txn: dict[int, list[int]] = {}
    for event in events_of(assemble(major, "text")):
        by_txn.setdefault(event.commit_lsn, []).append(event.seq)
    for seqs in by_txn.values():
        assert seqs == list(range(len(seqs)))


@pytest.mark.parametrize("run", ["binary", "v1", "streaming", "two_phase"])
def test_every_way_of_travelling_gives_the_same_events(major: int, run: str) -> None:
    expected = [same(e) for e in events_of(assemble(major, "text"))]
    got = [same(e) for e in events_of(assemble(major, run))]
    assert got == expected


def test_the_pure_python_path_gives_what_the_c_path_gives(
    major: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = events_of(assemble(major, "text"))
    monkeypatch.setattr(walex.transactions, "_run_fast", None)
    slow = events_of(assemble(major, "text"))
    assert [same(e) for e in slow] == [same(e) for e in fast]


def test_streamed_transactions_drop_what_was_rolled_back(major: int) -> None:
    events = events_of(assemble(major, "streaming"))
    big = [e.new_record["id"] for e in events if e.table == "big" and e.type == "insert"]
    assert [i for i in big if i >= 1000] == [*range(1000, 1601), 3000, *range(5000, 5601)]


def test_two_phase_delivers_at_commit_prepared_and_holds_until_then(major: int) -> None:
    asm = Assembler(max_batch_events=5000, max_batch_bytes=64 << 20)
    seen_holds: list[dict[object, int]] = []
    batches: list[Batch] = []
    for lsn, msg in corpus(major, "two_phase"):
        for item in drain(asm, [frame(lsn, msg)]):
            if isinstance(item, Batch):
                batches.append(item)
        seen_holds.append(dict(asm.holds))
    asm.close()
    gids = [b.transaction.gid for b in batches if b.transaction.gid]
    assert "gid-commit" in gids
    assert "gid-streamed" in gids
    assert "gid-rollback" not in gids
    # While each was prepared, its prepare LSN held the checkpoint back.
    held = {gid for holds in seen_holds for gid in holds}
    assert {"gid-commit", "gid-rollback", "gid-streamed"} <= held
    assert asm.holds == {}


@pytest.mark.parametrize("size", [1, 7, 100])
def test_large_transactions_are_cut_into_bounded_batches(major: int, size: int) -> None:
    whole = assemble(major, "text")
    cut = assemble(major, "text", max_batch_events=size)
    batches = [b for b in cut if isinstance(b, Batch)]
    assert all(len(b.events) <= size for b in batches)
    # Only the last part of a transaction ends it and carries its end.
    for b in batches:
        assert (b.end_lsn is not None) == b.last
    assert [same(e) for e in events_of(cut)] == [same(e) for e in events_of(whole)]
    assert [i for i in cut if not isinstance(i, Batch)] == [
        i for i in whole if not isinstance(i, Batch)
    ]


def test_batches_are_bounded_in_bytes_too(major: int) -> None:
    cut = assemble(major, "text", max_batch_bytes=2000)
    batches = [b for b in cut if isinstance(b, Batch)]
    # A wide transaction (the 5 big rows, the 602 streamed ones) is cut by size.
    assert len(batches) > len([b for b in assemble(major, "text") if isinstance(b, Batch)])


def _txn_frames(major: int) -> list[bytes]:
    """The frames of the first transaction of the corpus (Begin .. Commit)."""
    out = []
    for lsn, msg in corpus(major, "text"):
        out.append(frame(lsn, msg))
        if msg[:1] == b"C":
            return out
    raise AssertionError("no commit in the corpus")


def test_a_keepalive_while_idle_is_a_position_and_inside_a_transaction_is_not(
    major: int,
) -> None:
    asm = Assembler(max_batch_events=5000, max_batch_bytes=64 << 20)
    txn = _txn_frames(major)
    inside = 2**39
    items = list(drain(asm, [keepalive(100), *txn[:-1], keepalive(inside, reply=True)]))
    assert items == [100]  # the one inside the open transaction says nothing
    assert asm.reply_requested
    assert asm.server_wal_end == inside
    items = list(drain(asm, [txn[-1], keepalive(2**40)]))
    assert isinstance(items[0], Batch)
    assert items[1] == 2**40


def test_an_empty_transaction_is_a_position() -> None:
    begin = b"B" + struct.pack(">QqI", 0x500, 0, 7)
    commit = b"C" + struct.pack(">BQQq", 0, 0x500, 0x510, 0)
    asm = Assembler(max_batch_events=10, max_batch_bytes=1 << 20)
    assert list(drain(asm, [frame(0x4F0, begin), frame(0x500, commit)])) == [0x510]


def test_heartbeats_are_positions_not_events() -> None:
    prefix = HEARTBEAT_PREFIX.encode() + b"\x00"
    message = b"M" + b"\x00" + struct.pack(">Q", 0x700) + prefix + struct.pack(">I", 0)
    asm = Assembler(max_batch_events=10, max_batch_bytes=1 << 20)
    assert list(drain(asm, [frame(0x700, message)])) == [0x700]
    assert asm.heartbeats_received == 1
    assert asm.last_heartbeat_lsn == 0x700


def test_a_table_to_describe_is_asked_again_until_described(major: int) -> None:
    asm = Assembler(max_batch_events=5000, max_batch_bytes=64 << 20)
    asm.frames.extend(_txn_frames(major))
    need = asm.step()
    assert isinstance(need, Relation)
    # The caller's lookup failed (or was cancelled): nothing moves on.
    assert asm.step() is need
    assert not asm.ready
    asm.add_relation(codec(need))
    assert asm.step() is None
    (batch,) = asm.ready
    assert isinstance(batch, Batch)
    assert batch.events[0].table == need.name


def test_reset_drops_what_was_not_handed_on(major: int) -> None:
    asm = Assembler(max_batch_events=5000, max_batch_bytes=64 << 20)
    txn = _txn_frames(major)
    list(drain(asm, txn[:-1]))
    assert not asm.idle
    asm.reset()
    assert asm.idle
    assert not asm.frames
    # The server sends the transaction again, whole: it arrives once.
    items = list(drain(asm, txn))
    assert len([i for i in items if isinstance(i, Batch)]) == 1


def test_frames_walex_cannot_read_stop_with_their_position() -> None:
    asm = Assembler(max_batch_events=10, max_batch_bytes=1 << 20)
    asm.frames.append(b"x" + bytes(24))
    with pytest.raises(DecodeError, match="unknown replication frame type"):
        asm.step()
    asm = Assembler(max_batch_events=10, max_batch_bytes=1 << 20)
    asm.frames.append(frame(0x42, b"I" + bytes(3)))
    with pytest.raises(DecodeError, match="0/42"):
        asm.step()


def test_a_change_before_its_table_is_described_is_a_decode_error(major: int) -> None:
    txn = _txn_frames(major)
    insert = next(f for f in txn if f[25:26] == b"I")
    begin = txn[0]
    asm = Assembler(max_batch_events=10, max_batch_bytes=1 << 20)
    asm.frames.extend([begin, insert])
    with pytest.raises(DecodeError, match="never described"):
        asm.step()

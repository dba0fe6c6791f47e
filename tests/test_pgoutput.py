"""The pgoutput decoder, on bytes captured from Postgres 15 and 16.

The corpus comes from tests/data/make_corpus.py; it holds every message type.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from walex._accel import speedups
from walex.errors import DecodeError
from walex.lsn import LSN
from walex.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    Commit,
    CommitPrepared,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    decode,
)
from walex.pgoutput import decoder as decoder_module
from walex.pgoutput.decoder import read_tuple_py

DATA = Path(__file__).parent / "data"


def corpus(major: int, run: str) -> list[bytes]:
    with gzip.open(DATA / f"pgoutput-{major}.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    return [bytes.fromhex(r["hex"]) for r in rows if r["run"] == run]


def decode_all(messages: list[bytes]) -> list[object]:
    decoder = Decoder()
    return [decoder.decode(m) for m in messages]


MAJORS = [15, 16]
RUNS = ["text", "binary", "streaming", "v1", "two_phase"]


@pytest.mark.parametrize("major", MAJORS)
@pytest.mark.parametrize("run", RUNS)
def test_every_captured_message_decodes(major: int, run: str) -> None:
    msgs = decode_all(corpus(major, run))
    assert msgs
    kinds = Counter(type(m).__name__ for m in msgs)
    assert kinds["Begin"] == kinds["Commit"] > 0
    assert kinds["Relation"] > 0


@pytest.mark.parametrize("major", MAJORS)
def test_text_run_content(major: int) -> None:
    msgs = decode_all(corpus(major, "text"))
    rels = {m.name: m for m in msgs if isinstance(m, Relation)}
    items = rels["items"]
    assert items.namespace == "public"
    assert items.replica_identity == "d"
    assert [c.name for c in items.columns][:7] == [
        "id",
        "name",
        "qty",
        "price",
        "m",
        "tags",
        "doc",
    ]
    assert [c.flags for c in items.columns][:3] == [1, 0, 0]
    assert rels["full_items"].replica_identity == "f"
    assert rels["nothing_items"].replica_identity == "n"
    assert rels["idx_items"].replica_identity == "i"
    assert [c.name for c in rels["idx_items"].columns if c.flags & 1] == ["a", "b"]
    # The enum's Type message comes before the relation that uses it.
    assert any(isinstance(m, Type) and m.name == "mood" for m in msgs)

    inserts = [m for m in msgs if isinstance(m, Insert) and m.relation_oid == items.oid]
    first = inserts[0].new
    assert first.values[:4] == [b"1", b"apple", b"3", b"1.25"]
    assert first.text == 7
    assert first.binary == 0
    second = inserts[1].new
    assert second.values[1] is None
    assert second.values[3] == b"NaN"

    updates = [m for m in msgs if isinstance(m, Update)]
    # Key change under DEFAULT: the old key is sent ('K'); otherwise nothing.
    assert [u.old_kind for u in updates if u.relation_oid == items.oid] == [None, "K"]
    full = next(u for u in updates if u.relation_oid == rels["full_items"].oid)
    assert full.old_kind == "O"
    assert full.old is not None
    assert full.old.values[1] == b"x" * 10000
    # The unchanged TOASTed body is not sent in the new row.
    assert full.new.values[1] is UNCHANGED_TOAST
    assert full.new.toast == 1
    toast = next(u for u in updates if u.relation_oid == rels["toast_items"].oid)
    assert toast.old is None
    assert toast.new.values == [b"1", UNCHANGED_TOAST, b"2"]

    deletes = [m for m in msgs if isinstance(m, Delete)]
    assert {d.old_kind for d in deletes} == {"K", "O"}

    trunc = next(m for m in msgs if isinstance(m, Truncate))
    assert trunc.options == 3  # CASCADE | RESTART IDENTITY
    assert len(trunc.relation_oids) >= 2

    logical = [m for m in msgs if isinstance(m, LogicalMessage)]
    assert [(m.prefix, m.transactional) for m in logical] == [
        ("tx-prefix", True),
        ("plain", False),
    ]
    assert logical[0].content == b"inside"
    assert logical[1].content == b"\x00\xff"

    origin = next(m for m in msgs if isinstance(m, Origin))
    assert origin.name == "upstream"
    assert origin.commit_lsn == LSN.parse("0/ABCDEF")

    # The relation is described again after ALTER TABLE, with the new column.
    assert [c.name for c in [m for m in msgs if isinstance(m, Relation)][-1].columns][-1] in (
        "extra",
        "payload",
    )
    begins = [m for m in msgs if isinstance(m, Begin)]
    commits = [m for m in msgs if isinstance(m, Commit)]
    for b, c in zip(begins, commits, strict=True):
        assert b.final_lsn == c.commit_lsn
        assert c.end_lsn > c.commit_lsn
        assert b.commit_ts == c.commit_ts


@pytest.mark.parametrize("major", MAJORS)
def test_binary_run_sends_binary_values(major: int) -> None:
    msgs = decode_all(corpus(major, "binary"))
    ins = next(m for m in msgs if isinstance(m, Insert))
    assert ins.new.binary > 0
    assert ins.new.values[0] == (1).to_bytes(8, "big")  # bigint, binary


@pytest.mark.parametrize("major", MAJORS)
def test_streamed_messages(major: int) -> None:
    msgs = decode_all(corpus(major, "streaming"))
    starts = [m for m in msgs if isinstance(m, StreamStart)]
    assert starts
    assert starts[0].first_segment
    assert sum(isinstance(m, StreamStop) for m in msgs) == len(starts)
    aborts = [m for m in msgs if isinstance(m, StreamAbort)]
    # The rolled-back savepoint (a subtransaction) and the rolled-back transaction.
    assert any(a.subxid != a.xid for a in aborts)
    assert any(a.subxid == a.xid for a in aborts)
    assert all(a.abort_lsn is None for a in aborts)  # only with streaming=parallel
    commits = [m for m in msgs if isinstance(m, StreamCommit)]
    assert commits
    assert all(c.end_lsn > c.commit_lsn for c in commits)
    # Inside a stream block each change carries its (sub)transaction id.
    in_block = [m for m in msgs if isinstance(m, Insert) and m.xid is not None]
    assert {m.xid for m in in_block} >= {starts[0].xid}


@pytest.mark.parametrize("major", MAJORS)
def test_two_phase_messages(major: int) -> None:
    msgs = decode_all(corpus(major, "two_phase"))
    bp = [m for m in msgs if isinstance(m, BeginPrepare)]
    assert {m.gid for m in bp} == {"gid-commit", "gid-rollback"}
    prepares = [m for m in msgs if isinstance(m, Prepare)]
    assert [p.gid for p in prepares] == [b.gid for b in bp]
    assert all(p.prepare_lsn == b.prepare_lsn for p, b in zip(prepares, bp, strict=True))
    cp = [m for m in msgs if isinstance(m, CommitPrepared)]
    assert {m.gid for m in cp} == {"gid-commit", "gid-streamed"}
    rp = [m for m in msgs if isinstance(m, RollbackPrepared)]
    assert [m.gid for m in rp] == ["gid-rollback"]
    assert rp[0].rollback_end_lsn > rp[0].prepare_end_lsn
    sp = [m for m in msgs if isinstance(m, StreamPrepare)]
    assert [m.gid for m in sp] == ["gid-streamed"]


def test_version_1_has_no_xids() -> None:
    msgs = decode_all(corpus(16, "v1"))
    assert not any(isinstance(m, StreamStart) for m in msgs)
    assert all(getattr(m, "xid", None) is None for m in msgs if isinstance(m, Insert))


@pytest.mark.parametrize(
    "data",
    [b"", b"Z", b"B\x00", b"I\x00\x00\x00\x01N\x00\x01x", b"C" + b"\x00" * 30],
)
def test_malformed_messages_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_decode_error_names_the_lsn() -> None:
    err = DecodeError("broken", LSN.parse("1/2"))
    assert "at LSN 1/2" in str(err)
    assert err.lsn == LSN.parse("1/2")


_SAMPLES = corpus(16, "text")[:200] + corpus(16, "two_phase")[-60:]


@settings(max_examples=examples(400), deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash(data: bytes) -> None:
    for in_stream in (False, True):
        with contextlib.suppress(DecodeError):
            decode(data, in_stream)


@settings(max_examples=examples(600), deadline=None)
@given(st.sampled_from(_SAMPLES), st.data())
def test_damaged_real_messages_never_crash(msg: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(msg)))
    pos = data.draw(st.integers(0, max(0, len(msg) - 1)))
    byte = data.draw(st.integers(0, 255))
    damaged = bytearray(msg[:cut])
    if damaged and pos < len(damaged):
        damaged[pos] = byte
    with contextlib.suppress(DecodeError):
        decode(bytes(damaged))


def _python_or_error(data: bytes, pos: int) -> object:
    try:
        return read_tuple_py(data, pos)
    except (DecodeError, IndexError, struct.error):
        return DecodeError


def _c_or_error(data: bytes, pos: int) -> object:
    try:
        return decoder_module.read_tuple(data, pos)
    except DecodeError:
        return DecodeError


@pytest.mark.skipif(speedups is None, reason="the C speedup is not built")
@pytest.mark.parametrize("major", MAJORS)
@pytest.mark.parametrize("run", ["text", "binary", "streaming"])
def test_c_speedup_agrees_with_python_on_real_rows(major: int, run: str) -> None:
    assert decoder_module.read_tuple is not read_tuple_py
    for msg in corpus(major, run):
        if msg[:1] in (b"I", b"U", b"D"):
            # The tuple starts after the relation OID and the 'N'/'K'/'O'
            # marker (and the xid, in streams): try every start near there.
            for start in range(1, min(len(msg), 12)):
                assert _c_or_error(msg, start) == _python_or_error(msg, start)


@pytest.mark.skipif(speedups is None, reason="the C speedup is not built")
@settings(max_examples=examples(800), deadline=None)
@given(st.sampled_from(_SAMPLES), st.data())
def test_c_speedup_agrees_with_python_on_damaged_rows(msg: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(msg)))
    pos = data.draw(st.integers(0, max(0, len(msg) - 1)))
    damaged = bytearray(msg[:cut])
    if damaged and pos < len(damaged):
        damaged[pos] = data.draw(st.integers(0, 255))
    start = data.draw(st.integers(0, 12))
    assert _c_or_error(bytes(damaged), start) == _python_or_error(bytes(damaged), start)


@pytest.mark.skipif(speedups is None, reason="the C speedup is not built")
@settings(max_examples=examples(800), deadline=None)
@given(st.sampled_from([m for m in _SAMPLES if m[:1] in (b"I", b"U", b"D")]), st.data())
def test_c_fast_path_never_crashes_on_damaged_frames(msg: bytes, data: st.DataObject) -> None:
    from walex._accel import speedups as _speedups
    from walex.events import Event

    relid = struct.unpack_from(">I", msg, 1)[0]
    ncols = data.draw(st.integers(0, 10))
    names = tuple(f"c{i}" for i in range(ncols))
    fast_map = {relid: (names, tuple, tuple, None, dict.fromkeys(names))}
    cut = data.draw(st.integers(0, len(msg)))
    damaged = bytearray(msg[:cut])
    pos = data.draw(st.integers(0, max(0, len(damaged) - 1)))
    if damaged and pos < len(damaged):
        damaged[pos] = data.draw(st.integers(0, 255))
    frame = b"w" + bytes(24) + bytes(damaged)
    result = _speedups.row_event(frame, fast_map, None, 0)
    assert result is None or isinstance(result, Event)
    if result is not None:
        record = result.new_record if result.new_record is not None else result.old_record
        assert record is not None
        assert list(record) == list(names)

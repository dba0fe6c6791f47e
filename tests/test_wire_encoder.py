"""walex.wire.dumpb: one fast path from an Event to its bytes, byte for byte dumps's.

The reference is ``json.dumps(wire.to_dict(event), ensure_ascii=False,
separators=(",", ":")).encode()``. ``dumpb`` must write exactly those bytes,
or raise what that raises, with the C encoder (walex._accel) and with it
switched off (the pure-Python path that ``WALEX_IMPL=python`` runs). Where the
C encoder answers at all, it answers the same; where the reference raises, it
leaves the event to the Python path.
"""

from __future__ import annotations

import json
import math
import sys
import tracemalloc
from array import array
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from enum import Enum, Flag, IntEnum, StrEnum
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any
from uuid import UUID

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.multirange import Multirange
from psycopg.types.range import Range

import walex
from tests.fix_pg import Database
from tests.fuzz import examples
from tests.helpers import TYPE_MATRIX, USER_TYPES
from tests.streams import collect
from walex import wire
from walex.events import Event, Source, Transaction, message_event, row_event, truncate_event
from walex.lsn import LSN
from walex.wire import JSON_SCHEMA, dumpb, dumps, encode_value, to_dict

MODES = [pytest.param(False, id="text"), pytest.param(True, id="binary")]
VALIDATOR = jsonschema.Draft202012Validator(
    JSON_SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
C_BUILT = wire._c_encode is not None
needs_c = pytest.mark.skipif(not C_BUILT, reason="the C extension is not built")


def reference(event: Event) -> bytes:
    return json.dumps(to_dict(event), ensure_ascii=False, separators=(",", ":")).encode()


@contextmanager
def python_only() -> Iterator[None]:
    """dumpb without the C encoder (what WALEX_IMPL=python runs)."""
    saved = wire._c_encode
    wire._c_encode = None
    try:
        yield
    finally:
        wire._c_encode = saved


def outcome(fn: Callable[[Event], Any], event: Event) -> tuple[str, Any]:
    try:
        return ("ok", fn(event))
    except Exception as exc:
        return ("raises", type(exc))


def c_encode(event: Event) -> bytes | None:
    assert wire._c_encode is not None
    return wire._c_encode(event, encode_value)


def check(event: Event) -> tuple[str, Any]:
    """dumpb with C and without gives the reference's answer; returns it."""
    want = outcome(reference, event)
    assert outcome(dumpb, event) == want
    with python_only():
        assert outcome(dumpb, event) == want
    if C_BUILT:
        if want[0] == "ok":
            # The C encoder answers for every value here: it must not leave
            # the common cases to the slow path.
            assert c_encode(event) == want[1]
        else:
            assert c_encode(event) is None
    return want


# -- values of every kind -------------------------------------------------------


class Mood(Enum):
    SAD = "sad"
    THREE = 3
    HALF = Decimal("0.5")
    PAIR = (1, "x")


class Level(IntEnum):
    LOW = 1


class Color(StrEnum):
    RED = "red"


class Perm(Flag):
    R = 4


class Ratio(float, Enum):
    HALF = 0.5


class Thing:
    def __str__(self) -> str:
        return 'thing "✓"\n'


class MyStr(str):
    __slots__ = ()


class MyFloat(float):
    __slots__ = ()


class FixedTz(tzinfo):
    """A tzinfo of its own: isoformat() asks it for the offset."""

    def __init__(self, offset: timedelta | None) -> None:
        self.offset = offset

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return self.offset

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None


Pair = namedtuple("Pair", ["x", "y"])  # what psycopg makes of a composite

DAY = timedelta(hours=23, minutes=59, seconds=59, microseconds=999999)
tzs = st.one_of(
    st.none(),
    st.just(UTC),
    st.builds(timezone, st.timedeltas(min_value=-DAY, max_value=DAY)),
    st.timezones(),
    st.sampled_from([FixedTz(None), FixedTz(timedelta(minutes=-90, microseconds=7))]),
)
# Text json.dumps escapes (control characters, quotes, backslashes) and text
# it writes as UTF-8 (non-ASCII, line separators, astral characters).
chars = st.one_of(
    st.characters(codec="utf-8"),
    st.characters(max_codepoint=0x1F),
    st.sampled_from('"\\/\x7f\u2028\u2029\U0001f600é'),
)
texts = st.text(chars, max_size=12)
names = st.text(chars, min_size=1, max_size=6)
decimals = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [Decimal(x) for x in ("sNaN", "-sNaN12", "NaN", "-Infinity", "1E+5", "-0", "1.000E-30")]
    ),
)
ints = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.sampled_from([2**200, -(2**200), 10**40]),
)
binary = st.one_of(
    st.binary(max_size=8),
    st.binary(max_size=8).map(bytearray),
    st.binary(max_size=8).map(memoryview),
    st.binary(min_size=2, max_size=8).map(lambda b: memoryview(b)[::2]),  # not contiguous
    st.lists(st.integers(-5, 5), max_size=3).map(lambda x: memoryview(array("i", x))),
)
odd = st.sampled_from(
    [
        Thing(),
        MyStr("sub\nclass"),
        MyFloat(2.5),
        MyFloat("nan"),
        Level.LOW,
        Color.RED,
        Perm.R,
        Ratio.HALF,
        PurePosixPath("/tmp/x"),
        frozenset({1}),
        {1: "int key", "1": "str key"},
        OrderedDict(a=1, b=[2]),
        MappingProxyType({"k": Decimal("1.5")}),
    ]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(),
    texts,
    decimals,
    st.datetimes(timezones=tzs),
    st.dates(),
    st.times(timezones=tzs),
    st.timedeltas(),
    st.uuids(),
    st.builds(ip_address, st.one_of(st.ip_addresses())),
    st.sampled_from(
        [ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"), ip_interface("1.2.3.4/24")]
    ),
    binary,
    st.sampled_from(list(Mood)),
    odd,
)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(), texts),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    maybe = st.one_of(st.none(), inner)
    bounds = st.sampled_from(["[)", "(]", "()", "[]"])
    ranges = st.one_of(st.builds(Range, maybe, maybe, bounds), st.just(Range(empty=True)))
    return st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(texts, inner, max_size=3),
        st.builds(Pair, inner, inner),
        ranges,
        st.lists(ranges, max_size=3).map(Multirange),
    )


values = st.one_of(json_like, st.recursive(scalars, _containers, max_leaves=6))
records = st.dictionaries(names, values, max_size=5)
lsns = st.integers(min_value=0, max_value=2**64 - 1)
# Commit times: UTC as walex makes them, or any whole-minute offset (RFC 3339
# has no seconds in an offset, and the schema checks the format).
aware = st.datetimes(
    timezones=st.one_of(
        st.just(UTC), st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
    )
)
transactions = st.builds(
    Transaction,
    xid=st.integers(min_value=0, max_value=2**32 - 1),
    commit_lsn=lsns.map(LSN),
    commit_timestamp=aware,
)
sources = st.builds(
    Source,
    database=st.just("app"),
    schema=texts,
    table=texts,
    columns=st.just({}),
    primary_key=st.lists(names, unique=True, max_size=3).map(tuple),
    replica_identity=st.sampled_from(["full", "default", "index", "nothing"]),
    identity_columns=st.just(()),
    relation_oid=st.integers(min_value=0, max_value=2**32 - 1),
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(["insert", "update", "delete", "truncate", "message"]))
    txn = draw(transactions)
    lsn = draw(lsns)
    seq = draw(st.integers(min_value=0, max_value=10**6))
    if kind == "message":
        content = draw(st.one_of(st.binary(max_size=12), texts.map(str.encode), st.just(b"")))
        transactional = draw(st.one_of(st.booleans(), st.none()))
        event = message_event(draw(texts), content, True, lsn, seq, txn)
        return event._replace(transactional=transactional)
    source = draw(sources)
    if kind == "truncate":
        truncated = tuple(draw(st.lists(texts, max_size=3)))
        return truncate_event(
            source, lsn, seq, txn, truncated, draw(st.booleans()), draw(st.booleans())
        )
    new = draw(records) if kind != "delete" else None
    old: dict[str, Any] | None = None
    if kind == "delete":
        old = draw(st.one_of(records, st.none()))
    elif kind == "update" and new is not None:
        shape = draw(st.sampled_from(["none", "derived", "own"]))
        if shape == "derived":
            # The old row of the same columns, some values changed: the very
            # same objects elsewhere (a NaN is unequal to itself all the same).
            old = {k: draw(values) if draw(st.booleans()) else v for k, v in new.items()}
            old.update(draw(records))
        elif shape == "own":
            old = draw(records)
    toast = draw(st.frozensets(names, max_size=3))
    return row_event(kind, source, new, old, toast, lsn, seq, txn)


@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(events())
def test_dumpb_writes_what_json_dumps_writes(event: Event) -> None:
    kind, data = check(event)
    if kind == "ok":
        doc = json.loads(data)
        errors = sorted(VALIDATOR.iter_errors(doc), key=str)
        assert not errors, [e.message for e in errors]
        assert data == dumps(event).encode()


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        1e-07,
        1e16,
        -0.0,
        5e-324,
        1.7976931348623157e308,
        float("nan"),
        float("-inf"),
        2**64,
        -(2**63),
        10**100,
        Decimal("1E+5"),
        Decimal("-1.000E-30"),
        Decimal("NaN"),
        Decimal("-sNaN"),
        Decimal("Infinity"),
        '\x00\x1f\x7f "\\ \b\f\n\r\t é ✓ \u2028 \U0001f600',
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30, seconds=-7))),
        datetime(2024, 5, 1, tzinfo=timezone(-timedelta(microseconds=1))),
        datetime(2024, 5, 1, tzinfo=FixedTz(timedelta(hours=3, microseconds=7))),
        datetime(2024, 5, 1, tzinfo=FixedTz(None)),
        date(2024, 2, 29),
        time(13, 45, 59, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        time(0, 0, tzinfo=UTC),
        timedelta(days=-1, seconds=86399),
        timedelta(days=-999999999),
        timedelta(days=999999999, seconds=86399, microseconds=999999),
        timedelta(microseconds=1),
        UUID(int=0),
        UUID(int=2**128 - 1),
        ip_address("::ffff:1.2.3.4"),
        ip_interface("2001:db8::1/64"),
        b"",
        bytearray(b"\x00\xff"),
        memoryview(b"abc"),
        memoryview(b"abcdef")[1::2],
        Range(empty=True),
        Range(None, None, "()"),
        Range(date(2024, 1, 1), None, "[)"),
        Multirange([Range(1, 3), Range(5, 7)]),
        Multirange(),
        Pair(7, Mood.SAD),
        Mood.PAIR,
        Ratio.HALF,
        Level.LOW,
        Thing(),
        {"nested": [{"deep": [1, [2, [3, {"x": None}]]]}], "": ""},
        {1: "a", "1": "b"},
        OrderedDict(z=1, a=2),
        [(), [], {}],
        None,
        True,
    ],
    ids=repr,
)
def test_each_kind_of_value(value: Any) -> None:
    source = Source("app", "public", "t", {}, ("id",), "full", ("id",), 1)
    txn = Transaction(7, LSN(0x16B374D848), datetime(2024, 5, 1, 12, tzinfo=UTC))
    insert = row_event("insert", source, {"id": 1, "v": value}, None, set(), 5, 0, txn)
    assert check(insert)[0] == "ok"
    # In an update's changes too (a signaling NaN refuses to compare: both raise).
    update = row_event("update", source, {"id": 1, "v": value}, {"id": 1, "v": 0}, set(), 6, 1, txn)
    check(update)


def test_the_bench_rows_take_the_c_path() -> None:
    source = Source("bench", "public", "bench_rows", {}, ("id",), "full", ("id",), 16384)
    txn = Transaction(900, LSN(0x16B374D848), datetime(2024, 1, 1, tzinfo=UTC))
    row = {
        "id": 12,
        "name": "c12-c20a",
        "qty": 12,
        "price": Decimal("1.71"),
        "active": False,
        "created_at": datetime(2024, 1, 1, 0, 0, 12, tzinfo=UTC),
        "attrs": {"color": "blue", "size": 12, "tags": ["a", "b"]},
        "ref": UUID("c20ad4d7-6fe9-7759-aa27-a0c99bff6710"),
    }
    for event in (
        row_event("insert", source, row, None, frozenset(), 1, 0, txn),
        row_event("update", source, {**row, "qty": 13}, row, frozenset(), 2, 1, txn),
        row_event("delete", source, None, row, frozenset(), 3, 2, txn),
    ):
        assert check(event)[0] == "ok"
        if C_BUILT:
            assert c_encode(event) is not None


def test_an_update_reports_a_nan_as_changed_as_python_does() -> None:
    nan = float("nan")
    source = Source("app", "public", "t", {}, ("id",), "full", ("id",), 1)
    txn = Transaction(7, LSN(1), datetime(2024, 5, 1, tzinfo=UTC))
    event = row_event("update", source, {"id": 1, "f": nan}, {"id": 1, "f": nan}, set(), 5, 0, txn)
    # The same object: Python's != says "changed", with no identity shortcut.
    assert json.loads(dumpb(event))["changes"] == {"f": ["NaN", "NaN"]}
    check(event)


def _raises_both_ways(event: Event, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        reference(event)
    with pytest.raises(exc):
        dumpb(event)
    with python_only(), pytest.raises(exc):
        dumpb(event)
    if C_BUILT:
        assert c_encode(event) is None


@settings(max_examples=examples(100), deadline=None)
@given(
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
    st.sampled_from(["value", "key", "json key", "prefix", "schema", "toast"]),
)
def test_a_lone_surrogate_raises_as_dumps_encode_does(bad: str, where: str) -> None:
    # json.dumps writes a lone surrogate into its str; UTF-8 cannot hold it.
    source = Source("app", bad if where == "schema" else "s", "t", {}, (), "full", (), 1)
    txn = Transaction(7, LSN(1), datetime(2024, 5, 1, tzinfo=UTC))
    record = {
        "value": {"v": bad},
        "key": {bad: 1},
        "json key": {"j": {"a": [{bad: 1}]}},
    }.get(where, {"v": 1})
    toast = frozenset({bad}) if where == "toast" else frozenset()
    event = row_event("insert", source, record, None, toast, 5, 0, txn)
    if where == "prefix":
        event = message_event(bad, b"x", True, 5, 0, txn)
    _raises_both_ways(event, UnicodeEncodeError)


def test_a_comparison_that_raises_raises_the_same() -> None:
    # Decimal refuses to compare a signaling NaN: Event.changes raises.
    source = Source("app", "public", "t", {}, ("id",), "full", ("id",), 1)
    txn = Transaction(7, LSN(1), datetime(2024, 5, 1, tzinfo=UTC))
    snan = Decimal("sNaN")
    event = row_event("update", source, {"d": snan}, {"d": snan}, set(), 5, 0, txn)
    _raises_both_ways(event, InvalidOperation)


def test_an_int_beyond_the_digit_limit_raises_as_dumps_does() -> None:
    limit = sys.get_int_max_str_digits()
    source = Source("app", "public", "t", {}, (), "default", (), 1)
    txn = Transaction(7, LSN(1), datetime(2024, 5, 1, tzinfo=UTC))
    event = row_event("insert", source, {"n": 10 ** (limit + 1)}, None, set(), 5, 0, txn)
    _raises_both_ways(event, ValueError)
    # Below the limit every digit is written.
    event = row_event("insert", source, {"n": 10 ** (limit - 1)}, None, set(), 5, 0, txn)
    assert check(event)[0] == "ok"


def test_deep_json_and_unusual_events_take_the_python_path() -> None:
    source = Source("app", "public", "t", {}, ("id",), "full", ("id",), 1)
    txn = Transaction(7, LSN(1), datetime(2024, 5, 1, tzinfo=UTC))
    deep: Any = "bottom"
    for _ in range(150):
        deep = {"d": [deep]}
    event = row_event("insert", source, {"id": 1, "j": deep}, None, set(), 5, 0, txn)
    assert dumpb(event) == reference(event)
    if C_BUILT:
        assert c_encode(event) is None  # deeper than the C encoder goes

    class MyEvent(Event):
        __slots__ = ()

    odd_events = [
        MyEvent(*event),
        event._replace(new_record=OrderedDict(id=1)),  # a record that is not a dict
        event._replace(new_record={1: "not a column name"}),
        event._replace(source=Source("app", "s", "t", {}, ["id"], "full", (), 1)),  # type: ignore[arg-type]
        event._replace(source=Source("app", "s", "t", {}, ("id", "id"), "full", (), 1)),
        event._replace(transaction=Transaction(7, 1, datetime(2024, 5, 1, tzinfo=UTC))),  # type: ignore[arg-type]
    ]
    for odd_event in odd_events:
        want = outcome(reference, odd_event)
        assert outcome(dumpb, odd_event) == want
        if C_BUILT:
            assert c_encode(odd_event) is None


@needs_c
def test_the_c_encoder_keeps_no_references_and_no_memory() -> None:
    """Every path of the C encoder (written, values from the fallback, events
    given up, exceptions) leaves the reference counts of what it touched as
    they were, and allocates nothing that stays."""
    key = "".join(["col", "umn"])  # objects of this test's own
    price = Decimal("12.50")
    stamp = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC)
    fallback_value = Thing()
    nan = float("nan")
    source = Source("app", "public", "t", {}, (key,), "full", (key,), 1)
    txn = Transaction(7, LSN(0x16B374D848), stamp)
    record = {key: price, "at": stamp, "o": fallback_value, "j": {"a": [1, nan]}, "p": Pair(1, 2)}
    sample = [
        row_event("insert", source, record, None, frozenset(), 5, 0, txn),
        row_event("update", source, record, dict(record, at=None), frozenset({"x"}), 6, 1, txn),
        row_event("insert", source, {key: "\ud800"}, None, frozenset(), 7, 2, txn),  # given up
        row_event("update", source, {key: Decimal("sNaN")}, dict(record), set(), 8, 3, txn),
        message_event("p", b"\xff", True, 9, 4, txn),
        truncate_event(source, 10, 5, txn, ("public.t",), True, False),
    ]
    watched = [key, price, stamp, fallback_value, nan, source, txn, record, *sample]

    def run(times: int) -> None:
        for _ in range(times):
            for event in sample:
                c_encode(event)

    run(2)  # the caches take their references
    counts = [sys.getrefcount(o) for o in watched]
    tracemalloc.start()
    try:
        run(10)
        before = tracemalloc.get_traced_memory()[0]
        run(5000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(o) for o in watched] == counts
    assert grown < 50_000, f"{grown} bytes more after 30,000 encodings"


# -- real events ---------------------------------------------------------------


@pytest.mark.parametrize(
    "binary", [pytest.param(False, id="text"), pytest.param(True, id="binary")]
)
async def test_every_type_from_postgres_encodes_the_same_both_ways(
    db: Database, binary: bool
) -> None:
    for ddl in USER_TYPES:
        db.execute(ddl)
    db.execute(
        "CREATE TABLE matrix (id int PRIMARY KEY, "
        + ", ".join(f"{name} {sql_type}" for name, sql_type, _ in TYPE_MATRIX)
        + ")"
    )
    db.execute("ALTER TABLE matrix REPLICA IDENTITY FULL")
    columns = ", ".join(name for name, _, _ in TYPE_MATRIX)
    full = ", ".join(literal for _, _, literal in TYPE_MATRIX)
    nulls = ", ".join("NULL" for _ in TYPE_MATRIX)
    pub = db.unique("pub")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE matrix")
    statements = [
        f"INSERT INTO matrix (id, {columns}) VALUES (1, {full}), (2, {nulls})",
        "UPDATE matrix SET c_text = c_text || ' ✓', c_numeric = 1, c_int4_arr = '{9}' WHERE id = 1",
        "UPDATE matrix SET id = 3 WHERE id = 2",
        "DELETE FROM matrix WHERE id = 1",
        "TRUNCATE matrix",
        "SELECT pg_logical_emit_message(true, 'audit', 'text ✓ \"q\"')",
        "SELECT pg_logical_emit_message(false, 'bin', '\\xff00'::bytea)",
    ]
    async with walex.connect(db.dsn, publication=pub, binary=binary) as stream:
        with db.connect() as conn:
            for statement in statements:
                conn.execute(statement)
        events = await collect(stream, 8, 20.0)
    assert [e.type for e in events] == [
        "insert",
        "insert",
        "update",
        "update",
        "delete",
        "truncate",
        "message",
        "message",
    ]
    for event in events:
        kind, data = check(event)
        assert kind == "ok", data
        errors = sorted(VALIDATOR.iter_errors(json.loads(data)), key=str)
        assert not errors, f"{event.type}: {[e.message for e in errors]}"
    changes = json.loads(dumpb(events[2]))["changes"]
    assert {"c_text", "c_numeric", "c_int4_arr"} <= changes.keys()
    # NaN compares unequal to itself: reported as changed, as Event.changes does.
    assert math.isnan(events[2].new_record["c_float8_nan"])  # type: ignore[index]
    assert changes["c_float8_nan"] == ["NaN", "NaN"]

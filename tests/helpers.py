"""Helpers that tests share (test modules never import each other).

Fixtures live in ``fix_*.py`` (loaded by conftest.py); plain functions and
classes that several test modules call live here.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import pytest

from tests.fix_pg import Database
from walex import WalEx
from walex.lsn import LSN

__all__ = [
    "HOSTILE",
    "SECRET_PIECES",
    "TYPE_MATRIX",
    "USER_TYPES",
    "Proc",
    "confirmed_flush",
    "make_app",
    "seed_tables",
    "until",
    "wait_for",
    "walex_proc",
]


class Proc:
    """A ``walex`` subprocess whose output lines are read with a timeout."""

    def __init__(self, args: list[str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "walex", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        self.lines: dict[str, queue.Queue[str | None]] = {}
        self.seen: dict[str, list[str]] = {}
        self.threads: list[threading.Thread] = []
        # A thread per pipe: select() cannot see what a text pipe has buffered.
        for name in ("stdout", "stderr"):
            q: queue.Queue[str | None] = queue.Queue()
            self.lines[name] = q
            self.seen[name] = []
            pipe = getattr(self.popen, name)
            thread = threading.Thread(target=self._pump, args=(pipe, q), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _pump(pipe: IO[str], q: queue.Queue[str | None]) -> None:
        for line in pipe:
            q.put(line)
        q.put(None)

    def read_line(self, stream: str = "stdout", timeout: float = 20) -> str:
        """The next line; fail after *timeout* seconds or at the end of output."""
        try:
            line = self.lines[stream].get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line on {stream} within {timeout:.0f}s; so far: {self.seen}")
        if line is None:
            self.lines[stream].put(None)
            pytest.fail(f"walex ended (exit {self.popen.wait(10)}); output: {self.seen}")
        self.seen[stream].append(line)
        return line

    def rest(self, stream: str, timeout: float = 10) -> str:
        """What is left of *stream* once the process has ended."""
        out = []
        while (line := self.lines[stream].get(timeout=timeout)) is not None:
            out.append(line)
        self.lines[stream].put(None)
        return "".join(out)

    def stop(self) -> int:
        """Ctrl-C, and the exit code."""
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout=20)


@contextmanager
def walex_proc(*args: str) -> Iterator[Proc]:
    """Run ``walex ARGS`` in a subprocess; kill it if the test fails."""
    proc = Proc(list(args))
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait(timeout=10)
        for thread in proc.threads:
            thread.join(timeout=10)
        for pipe in (proc.popen.stdout, proc.popen.stderr):
            if pipe is not None:
                pipe.close()


def wait_for(proc: Proc, text: str, stream: str = "stderr", timeout: float = 30) -> str:
    """Skip lines until one holds *text*."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.read_line(stream, timeout=max(0.1, deadline - time.monotonic()))
        if text in line:
            return line


# -- apps against a test database ------------------------------------------------


async def until(predicate: Callable[[], bool], within: float = 15.0, what: str = "it") -> None:
    """Wait (without blocking the loop) until *predicate* holds; fail after *within* s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def confirmed_flush(db: Database, slot: str) -> LSN:
    rows = db.fetch(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return LSN.parse(rows[0][0])


def seed_tables(db: Database, identity: str = "FULL") -> str:
    """The seed README's tables and a publication for them; returns the publication."""
    pub = db.unique("events")
    db.execute(
        "CREATE TABLE user_account (id int PRIMARY KEY, email text, name text,"
        " updated_at timestamptz DEFAULT now())"
    )
    db.execute(
        "CREATE TABLE todo (id int PRIMARY KEY, title text, status text DEFAULT 'open',"
        " updated_at timestamptz DEFAULT now())"
    )
    db.execute(f"ALTER TABLE user_account REPLICA IDENTITY {identity}")
    db.execute(f"ALTER TABLE todo REPLICA IDENTITY {identity}")
    db.execute(f"CREATE PUBLICATION {pub} FOR TABLE user_account, todo")
    return pub


def make_app(db: Database, pub: str, **kw: Any) -> WalEx:
    kw.setdefault("name", db.unique("app"))
    kw.setdefault("retry_delay", 0.01)
    return WalEx(url=db.dsn, publication=pub, **kw)


# -- connection strings that must never show their password ---------------------

# Connection strings libpq cannot read, or that fail, each with a password
# holding "s3cret"; the second item is the start of walex's message.
HOSTILE = [
    ("postgresql://app:50%off-s3cret@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:s3cret@[127.0.0.1/app", "invalid connection string: end of string"),
    ('postgresql://app:s3cret"q@[::1/app', "invalid connection string: end of string"),
    ("postgresql://app:%zzs3cret@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:s3cret€%@127.0.0.1:1/app", "invalid connection string: invalid pe"),
    ("postgresql://app:p@s3cret:x@127.0.0.1:1/app", "could not connect to the server"),
    ("postgresql://app@127.0.0.1:1/app?password=s3cret%zz", "invalid connection string: invalid"),
    ("host=127.0.0.1 port=1 password=s3cret%zz foo=bar", "invalid connection string: invalid c"),
    ("postgresql://app:s3cret@127.0.0.1:1/app", "could not connect to the server"),
    ("host=127.0.0.1 port=1 password='s3 cret' user=app", "could not connect to the server"),
]
# Every piece of "s3cret" that a message might show.
SECRET_PIECES = ("s3c", "cret", "3cr")


# A user-defined enum, a domain over int and a composite using both.
USER_TYPES = (
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE DOMAIN posint AS integer CHECK (VALUE > 0)",
    "CREATE TYPE pair AS (x integer, y text, m mood, p posint)",
)

# Every type walex loads, with a value (tests/test_values.py checks each
# against a SELECT; tests/test_wire_encoder.py encodes them): (column, SQL
# type, SQL literal of the value in the first row), for a table whose key is
# "id int". In test_values.py the second row has NULL in every other column.
TYPE_MATRIX: list[tuple[str, str, str]] = [
    ("c_bool", "boolean", "true"),
    ("c_int2", "smallint", "-32768"),
    ("c_int4", "integer", "2147483647"),
    ("c_int8", "bigint", "-9223372036854775808"),
    # 1.5 is exact in float4; 0.1 would differ between psycopg's own text
    # loader (0.1) and its binary one (0.10000000149011612).
    ("c_float4", "real", "1.5"),
    ("c_float4_nan", "real", "'NaN'"),
    ("c_float4_pinf", "real", "'Infinity'"),
    ("c_float4_ninf", "real", "'-Infinity'"),
    ("c_float8", "double precision", "3.141592653589793"),
    ("c_float8_nan", "double precision", "'NaN'"),
    ("c_float8_pinf", "double precision", "'Infinity'"),
    ("c_float8_ninf", "double precision", "'-Infinity'"),
    ("c_numeric", "numeric", "'-12345678901234567890.000123456789'"),
    ("c_numeric_scaled", "numeric(10,2)", "'3.10'"),
    ("c_numeric_nan", "numeric", "'NaN'"),
    ("c_money", "money", "'1234.56'"),
    ("c_text", "text", "E'h\u00e9llo \u2713 \"q\" \\\\ tab\\t nl\\n end'"),
    ("c_varchar", "varchar(10)", "'abc'"),
    ("c_char", "char(5)", "'ab'"),
    ("c_name", "name", "'a_name'"),
    ("c_bytea", "bytea", r"'\x00ff10275c00'"),
    ("c_date", "date", "'2024-02-29'"),
    ("c_time", "time", "'13:45:59.123456'"),
    ("c_timetz", "timetz", "'13:45:59.123456+05:30'"),
    ("c_timestamp", "timestamp", "'2024-02-29 13:45:59.123456'"),
    ("c_timestamptz", "timestamptz", "'2024-02-29 13:45:59.123456+02'"),
    ("c_interval", "interval", "'1 year 2 months 3 days 04:05:06.789'"),
    ("c_interval_neg", "interval", "'-3 days -00:00:01.5'"),
    ("c_uuid", "uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"),
    ("c_json", "json", """'{"a": [1, 2.5, "x", null, true], "b": {"c": "\u00fc"}}'"""),
    ("c_jsonb", "jsonb", """'{"a": [1, 2.5, "x", null, false], "b": {}}'"""),
    ("c_jsonb_scalar", "jsonb", """'"just a string"'"""),
    ("c_inet", "inet", "'192.168.0.1/24'"),
    ("c_inet6", "inet", "'2001:db8::1'"),
    ("c_cidr", "cidr", "'10.0.0.0/8'"),
    ("c_macaddr", "macaddr", "'08:00:2b:01:02:03'"),
    ("c_macaddr8", "macaddr8", "'08:00:2b:01:02:03:04:05'"),
    ("c_bit", "bit(4)", "B'1010'"),
    ("c_varbit", "varbit", "B'10110'"),
    ("c_tsvector", "tsvector", "'a fat cat'"),
    ("c_tsquery", "tsquery", "'fat & rat'"),
    ("c_point", "point", "'(1,2)'"),
    ("c_line", "line", "'{1,-1,0}'"),
    ("c_lseg", "lseg", "'[(0,0),(1,1)]'"),
    ("c_box", "box", "'((1,1),(0,0))'"),
    ("c_path", "path", "'[(0,0),(1,1),(2,0)]'"),
    ("c_polygon", "polygon", "'((0,0),(1,1),(1,0))'"),
    ("c_circle", "circle", "'<(0,0),1>'"),
    ("c_int4range", "int4range", "'[1,10)'"),
    ("c_int4range_empty", "int4range", "'empty'"),
    ("c_int8range", "int8range", "'[1,)'"),
    ("c_numrange", "numrange", "'(1.5,2.5]'"),
    ("c_tsrange", "tsrange", "'[2024-01-01 00:00,2024-01-02 00:00)'"),
    ("c_tstzrange", "tstzrange", "'[2024-01-01 00:00+00,)'"),
    ("c_daterange", "daterange", "'[2024-01-01,2024-02-01)'"),
    ("c_int4multirange", "int4multirange", "'{[1,3),[5,7)}'"),
    ("c_int8multirange", "int8multirange", "'{}'"),
    ("c_nummultirange", "nummultirange", "'{[1.5,2.5]}'"),
    ("c_tsmultirange", "tsmultirange", "'{[2024-01-01,2024-01-02)}'"),
    ("c_tstzmultirange", "tstzmultirange", "'{[2024-01-01 00:00+00,2024-01-02 00:00+00)}'"),
    ("c_datemultirange", "datemultirange", "'{[2024-01-01,2024-01-05),[2024-02-01,)}'"),
    ("c_oid", "oid", "4294967295"),
    ("c_xid", "xid", "'123456'"),
    ("c_xid8", "xid8", "'12345678901'"),
    ("c_pg_lsn", "pg_lsn", "'16/B374D848'"),
    ("c_jsonpath", "jsonpath", "'$.a[*] ? (@ > 1)'"),
    ("c_enum", "mood", "'happy'"),
    ("c_domain", "posint", "42"),
    ("c_composite", "pair", """ROW(7, 'seven, "quoted"', 'sad', 3)"""),
    # Arrays: 1-D, 2-D, with NULLs, with a lower bound other than 1, empty.
    ("c_int4_arr", "integer[]", "'{1,2,3}'"),
    ("c_int4_arr2", "integer[][]", "'{{1,2},{3,4}}'"),
    ("c_int4_arr_null", "integer[]", "'{1,NULL,3}'"),
    # psycopg loads an array with other lower bounds as a plain list (the
    # bounds are dropped), in a SELECT as in walex.
    ("c_int4_arr_lb", "integer[]", "'[0:2]={1,2,3}'"),
    ("c_int4_arr_empty", "integer[]", "'{}'"),
    ("c_int8_arr", "bigint[]", "'{-9223372036854775808,NULL}'"),
    ("c_text_arr", "text[]", r"""'{"a,b","NULL",NULL,"\"q\"","","back\\slash"}'"""),
    ("c_text_arr2", "text[]", "'{{a,b},{c,NULL}}'"),
    ("c_varchar_arr", "varchar(5)[]", "'{x,y}'"),
    ("c_numeric_arr", "numeric[]", "'{1.5,NaN,NULL}'"),
    ("c_float8_arr", "float8[]", "'{1.5,NaN,Infinity,-Infinity}'"),
    ("c_bool_arr", "boolean[]", "'{t,f,NULL}'"),
    ("c_bytea_arr", "bytea[]", r"ARRAY['\x00ff'::bytea, NULL]"),
    ("c_date_arr", "date[]", "'{2024-02-29,NULL}'"),
    ("c_timestamptz_arr", "timestamptz[]", """'{"2024-02-29 13:45:59+02"}'"""),
    ("c_interval_arr", "interval[]", """'{"1 day",NULL}'"""),
    ("c_uuid_arr", "uuid[]", "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'"),
    ("c_jsonb_arr", "jsonb[]", """ARRAY['{"a": 1}'::jsonb, '[1, 2]'::jsonb, NULL]"""),
    ("c_inet_arr", "inet[]", "'{10.0.0.1,::1}'"),
    ("c_int4range_arr", "int4range[]", """'{"[1,2)",empty}'"""),
    ("c_money_arr", "money[]", "'{1.00,2.50}'"),
    ("c_point_arr", "point[]", """'{"(1,2)"}'"""),
    ("c_enum_arr", "mood[]", "'{sad,NULL,happy}'"),
    ("c_enum_arr2", "mood[]", "'{{sad,ok},{happy,ok}}'"),
    ("c_enum_arr_lb", "mood[]", "'[3:4]={ok,sad}'"),
    ("c_domain_arr", "posint[]", "'{1,NULL,2}'"),
    ("c_domain_arr2", "posint[]", "'[0:1][1:2]={{1,2},{3,4}}'"),
    (
        "c_composite_arr",
        "pair[]",
        "ARRAY[ROW(1, 'a', 'ok', 1)::pair, NULL, ROW(NULL, NULL, NULL, NULL)::pair]",
    ),
]

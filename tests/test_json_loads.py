"""walex's JSON loader: orjson's speed, the standard library's answers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from walex import values
from walex._accel import speedups as _speedups
from walex.values import json_loads, make_adapters

LOADERS = [pytest.param(json_loads, id="python")]
if _speedups is not None:
    LOADERS.append(pytest.param(_speedups.json_loads, id="c"))

TRICKY = [
    # numbers: int() for integers, float() for the rest, as json.loads
    b"0",
    b"-0",
    b"0.0",
    b"-0.0",
    b"1E2",
    b"1e-7",
    b"-1.5e+300",
    b"2.5E-308",
    b"4.9e-324",
    b"123456789012345678",
    b"-999999999999999999",
    b"1234567890123456789",
    b"0.30000000000000004",
    b"1" * 400,
    # strings and escapes
    b'""',
    b'"\\u0000\\u001f\\u007f"',
    b'"\\u00e9\\u20ac\\uFFFF"',
    b'"\\ud83d\\ude00"',
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"\\"\\\\\\/\\b\\f\\n\\r\\t"',
    '"h\\u00e9llo w\u00f6rld \u20ac \U0001f600"'.encode(),
    b'"\\\\u0041"',
    b'"tab\\there"',
    # structure
    b' \t\r\n{ "a" : [ 1 , { } , [ ] ] } \n',
    b'{"a": 1, "b": 2, "a": 3}',
    b'{"": {"": [null, true, false]}}',
    b"[" * 250 + b"]" * 250,
    b'{"k": ' * 250 + b"1" + b"}" * 250,
    # many keys: more than the C parser's key cache holds, some sharing a slot
    ("{" + ", ".join(f'"k{i}": {i}' for i in range(2000)) + "}").encode(),
    (
        "[" + ", ".join(f'{{"k{i % 700}": "v", "k{i % 3}": {i}}}' for i in range(3000)) + "]"
    ).encode(),
    # what Postgres' jsonb_out writes
    b'{"tags": ["a", "b"], "size": 3, "color": "red"}',
    b'{"a": {"b": [1.5, -2, "x\\"y"]}, "n": null}',
    # not JSON in the strict grammar, accepted by json.loads
    b"NaN",
    b"[Infinity, -Infinity]",
    b"\xef\xbb\xbf[1]",
    b'"\xed\xa0\x80"',
    b"12345678901234567890123",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"9223372036854775807",
    b"[1e400, -1e400]",
    b'{"a": [1, 2.5, "x", null, true], "b": {"c": "\\u00e9"}}',
    b'"a string with 12345678901234567890 digits"',
    b"[]",
    b"0.1",
]


def same(a: object, b: object) -> bool:
    """Equal, with the same types all the way down (1, 1.0 and True differ),
    dict keys in the same order, -0.0 apart from 0.0, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("loads", LOADERS)
@pytest.mark.parametrize("text", TRICKY)
def test_agrees_with_the_standard_library(loads: object, text: bytes) -> None:
    assert same(loads(text), json.loads(text))  # type: ignore[operator]


@pytest.mark.parametrize("loads", LOADERS)
def test_invalid_json_raises_like_the_standard_library(loads: object) -> None:
    with pytest.raises(ValueError, match="Expecting"):
        loads(b"{not json")  # type: ignore[operator]


BROKEN = [
    b"",
    b"   ",
    b"[1,]",
    b"[1 2]",
    b'{"a" 1}',
    b'{"a": 1,}',
    b"{1: 2}",
    b"01",
    b"1.",
    b".5",
    b"1e",
    b"-",
    b"+1",
    b"1 2",
    b"nul",
    b"truex",
    b'"unterminated',
    b'"raw \x01 control"',
    b'"bad \\q escape"',
    b'"\\x"',
    b'"\\u12"',
    b'"\\u12g4"',
    b"\xff",
    b'"\xc3"',
    b"[" * 5000,
]


@pytest.mark.parametrize("loads", LOADERS)
@pytest.mark.parametrize("text", BROKEN)
def test_broken_documents_fail_as_in_the_standard_library(loads: object, text: bytes) -> None:
    with pytest.raises(Exception) as expected:  # noqa: PT011 - whatever json.loads raises
        json.loads(text)
    with pytest.raises(expected.type):
        loads(text)  # type: ignore[operator]


@pytest.mark.skipif(_speedups is None, reason="the C speedup is not built")
def test_the_c_parser_answers_without_the_fallbacks() -> None:
    """The parser in C decides a strict JSON document alone; anything else
    goes to the fallbacks (orjson, then json.loads), whose answer stands."""
    assert _speedups is not None
    asked: list[bytes] = []

    def fallback(data: bytes) -> object:
        asked.append(data)
        return json.loads(data)

    try:
        _speedups.setup_json(None, None, fallback)
        doc = b'{"color": "red", "size": 3, "tags": ["a", "b"], "x": 1.5e3, "s": "\\u00e9"}'
        assert same(_speedups.json_loads(doc), json.loads(doc))
        assert asked == []
        assert math.isnan(_speedups.json_loads(b"NaN"))
        assert asked == [b"NaN"]
    finally:
        if values._orjson is not None:
            _speedups.setup_json(values._orjson.loads, values._orjson.JSONDecodeError, json.loads)
        else:
            _speedups.setup_json(None, None, json.loads)


# Every code point, surrogates included (json.dumps escapes them; with
# ensure_ascii=False a lone one cannot be encoded and the case is skipped).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(any_text, children, max_size=5)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("loads", LOADERS)
@settings(max_examples=examples(400), deadline=None)
@given(
    value=json_values,
    ascii_only=st.booleans(),
    layout=st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 2}]),
)
def test_random_documents(
    loads: object, value: object, ascii_only: bool, layout: dict[str, object]
) -> None:
    try:
        text = json.dumps(value, ensure_ascii=ascii_only, **layout).encode()  # type: ignore[arg-type]
    except UnicodeEncodeError:
        return  # a lone surrogate has no UTF-8
    assert same(loads(text), json.loads(text))  # type: ignore[operator]


def test_the_adapters_use_it_for_json_and_jsonb() -> None:
    from psycopg.adapt import Transformer
    from psycopg.pq import Format

    tx = Transformer(make_adapters())
    tx.set_loader_types([114, 3802], Format.TEXT)
    assert tx.load_sequence([b'{"n": 12345678901234567890123}', b"[1.5]"]) == (
        {"n": 12345678901234567890123},
        [1.5],
    )


JSONB_BINARY = [pytest.param(values._JsonbBinaryLoader(3802).load, id="python")]
if _speedups is not None:
    JSONB_BINARY.append(pytest.param(_speedups.jsonb_loads, id="c"))


@pytest.mark.parametrize("load", JSONB_BINARY)
@pytest.mark.parametrize("text", TRICKY)
def test_binary_jsonb_is_a_version_byte_and_the_text(load: object, text: bytes) -> None:
    assert same(load(b"\x01" + text), json.loads(text))  # type: ignore[operator]


@pytest.mark.parametrize("load", JSONB_BINARY)
@pytest.mark.parametrize("data", [b"", b"\x02{}", b"{}"])
def test_binary_jsonb_of_an_unknown_version_is_refused(load: object, data: bytes) -> None:
    with pytest.raises(ValueError, match="unknown jsonb binary format"):
        load(data)  # type: ignore[operator]

"""walex's JSON loader: orjson's speed, the standard library's answers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from walex.values import json_loads, make_adapters

try:
    from walex.pgoutput import _speedups
except ImportError:  # pragma: no cover
    _speedups = None  # type: ignore[assignment]

LOADERS = [pytest.param(json_loads, id="python")]
if _speedups is not None:
    LOADERS.append(pytest.param(_speedups.json_loads, id="c"))

TRICKY = [
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
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("loads", LOADERS)
@pytest.mark.parametrize("text", TRICKY)
def test_agrees_with_the_standard_library(loads: object, text: bytes) -> None:
    assert same(loads(text), json.loads(text))  # type: ignore[operator]


@pytest.mark.parametrize("loads", LOADERS)
def test_invalid_json_raises_like_the_standard_library(loads: object) -> None:
    with pytest.raises(ValueError, match="Expecting"):
        loads(b"{not json")  # type: ignore[operator]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@pytest.mark.parametrize("loads", LOADERS)
@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_random_documents(loads: object, value: object) -> None:
    text = json.dumps(value).encode()
    assert loads(text) == json.loads(text)  # type: ignore[operator]


def test_the_adapters_use_it_for_json_and_jsonb() -> None:
    from psycopg.adapt import Transformer
    from psycopg.pq import Format

    tx = Transformer(make_adapters())
    tx.set_loader_types([114, 3802], Format.TEXT)
    assert tx.load_sequence([b'{"n": 12345678901234567890123}', b"[1.5]"]) == (
        {"n": 12345678901234567890123},
        [1.5],
    )

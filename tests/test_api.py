"""The public surface: what `import walex` offers, and the LSN type."""

from __future__ import annotations

import pytest

import walex
from walex import LSN


def test_exported_members() -> None:
    exported = set(walex.__all__)
    assert exported == {
        "LSN",
        "Batch",
        "Event",
        "Source",
        "Stream",
        "Transaction",
        "WalEx",
        "WalexError",
        "__version__",
        "connect",
        "errors",
        "run",
    }
    for name in exported:
        assert hasattr(walex, name), name


@pytest.mark.parametrize(
    ("text", "value"),
    [("0/0", 0), ("16/B374D848", 0x16B374D848), ("FFFFFFFF/FFFFFFFF", 2**64 - 1), ("0/1", 1)],
)
def test_lsn_parses_and_prints(text: str, value: int) -> None:
    lsn = LSN.parse(text)
    assert lsn == value
    assert str(lsn) == text
    assert LSN(text) == lsn
    assert repr(lsn) == f"LSN('{text}')"
    assert f"{lsn}" == text


def test_lsn_compares_and_hashes_like_an_int() -> None:
    a, b = LSN.parse("1/0"), LSN.parse("0/FFFFFFFF")
    assert b < a
    assert sorted([a, b]) == [b, a]
    assert {a: 1}[LSN(2**32)] == 1
    assert a - b == 1


@pytest.mark.parametrize("bad", ["", "16", "16/", "/1", "xyz/1", "1/2/3", "123456789/0", "0/-1"])
def test_lsn_rejects_malformed_text(bad: str) -> None:
    with pytest.raises(ValueError, match="not an LSN"):
        LSN.parse(bad)


def test_lsn_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="64-bit"):
        LSN(-1)
    with pytest.raises(ValueError, match="64-bit"):
        LSN(2**64)

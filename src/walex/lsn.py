"""The LSN value type: a position in the write-ahead log.

A value type only: no I/O, no other walex module.

Postgres prints an LSN as two hexadecimal halves, ``"16/B374D848"``. walex
keeps it as an ``int`` subclass, so LSNs compare, sort and hash like the
numbers they are, and print the way Postgres prints them.

Example:
    >>> LSN.parse("16/B374D848")
    LSN('16/B374D848')
    >>> LSN(0x16B374D848) > LSN.parse("0/1")
    True
"""

from __future__ import annotations

import re

__all__ = ["LSN"]

_MAX = (1 << 64) - 1
_FORM = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


class LSN(int):
    """A write-ahead log position: an unsigned 64-bit integer."""

    __slots__ = ()

    def __new__(cls, value: int | str = 0) -> LSN:
        if isinstance(value, str):
            return cls.parse(value)
        if not 0 <= value <= _MAX:
            raise ValueError(f"an LSN is an unsigned 64-bit number, got {value}")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> LSN:
        """Parse Postgres' text form, ``"16/B374D848"``.

        Raises:
            ValueError: if *text* is not two hexadecimal halves of 32 bits.
        """
        match = _FORM.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not an LSN: {text!r} (expected the form '16/B374D848')")
        return super().__new__(cls, (int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"LSN('{self}')"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else int.__format__(self, spec)

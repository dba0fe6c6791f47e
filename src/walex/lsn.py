"""The LSN value type: a position in the write-ahead log.

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

__all__ = ["LSN"]

_MAX = (1 << 64) - 1


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
        high, sep, low = text.strip().partition("/")
        try:
            if not sep or not high or not low or len(high) > 8 or len(low) > 8:
                raise ValueError
            return super().__new__(cls, (int(high, 16) << 32) | int(low, 16))
        except ValueError:
            raise ValueError(f"not an LSN: {text!r} (expected the form '16/B374D848')") from None

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"LSN('{self}')"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else int.__format__(self, spec)

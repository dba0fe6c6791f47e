"""How hard the property tests try.

``WALEX_TEST_FUZZ=N`` runs N times as many examples in each of them, for a
longer search than the test command's (``tests/asan.sh`` uses it).
"""

from __future__ import annotations

import os

FACTOR = max(1, int(os.environ.get("WALEX_TEST_FUZZ", "1")))


def examples(n: int) -> int:
    """*n* examples, times ``WALEX_TEST_FUZZ``."""
    return n * FACTOR

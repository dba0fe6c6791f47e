"""Helpers shared by the tests of walex.embedded."""

from __future__ import annotations

from pathlib import Path

__all__ = ["gone"]


def gone(pid: int) -> bool:
    """True once the process has exited (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True

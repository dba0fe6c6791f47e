"""The checkpoint: which WAL position may be confirmed to Postgres, and when.

This is walex's at-least-once rule, in one object. Every batch handed to the
user is *issued* here, in stream order, and reported *done* when every
handler and destination for it has finished — in any order, so that several
batches can be in flight at once. The position confirmed to the server (the
flush LSN of the standby status update) is the end of the newest transaction
whose batches, and those of every transaction before it, are done: a
contiguous prefix, never the last one seen. Positions that carry no batch (an
empty or filtered transaction, a keepalive's WAL end while nothing is open, a
heartbeat) are *marks*: done as soon as everything issued before them is.

While a two-phase transaction is prepared but not yet committed, its prepare
LSN *holds* the confirmed position below it (the holds are owned by
:mod:`walex.transactions`; this object only reads them), so that a restart
decodes the prepared transaction again.

No I/O, no asyncio: the stream tells the server; this object decides what.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

from .lsn import LSN

_new_lsn = int.__new__

__all__ = ["Checkpoint", "Issued"]


class Issued(Protocol):
    """What can be issued: anything with the end LSN of its transaction
    (``None`` on a batch that does not end its transaction), such as a
    :class:`~walex.Batch`."""

    @property
    def end_lsn(self) -> int | None: ...


class _Mark:
    """A position with nothing to wait for but what was issued before it."""

    __slots__ = ("end_lsn",)

    def __init__(self, end_lsn: int) -> None:
        self.end_lsn = end_lsn


class Checkpoint:
    """Handled batches and marks in → the position to confirm out.

    Args:
        holds: positions that the confirmed position must stay at or below
            (the prepare LSN of each prepared, uncommitted transaction), read
            whenever the position moves; the caller keeps it up to date.
        on_advance: called with the new confirmed position each time it moves.

    Attributes:
        handled: the end of the newest transaction that is done with
            everything before it (the confirmed position, before holds).
        confirmed: what may be reported to the server as flushed.
    """

    __slots__ = (
        "_done_early",
        "_holds",
        "_on_advance",
        "_pending",
        "_stale",
        "confirmed",
        "handled",
    )

    def __init__(
        self,
        holds: Mapping[object, int] | None = None,
        on_advance: Callable[[LSN], object] | None = None,
    ) -> None:
        self._pending: deque[Issued] = deque()
        self._done_early: set[int] = set()  # id() of items done before those ahead of them
        # Items in flight when reset() was called, by id(); held, so that no
        # new item can be given the id of one of them.
        self._stale: dict[int, Issued] = {}
        self._holds: Mapping[object, int] = holds if holds is not None else {}
        self._on_advance = on_advance
        self.handled = LSN(0)
        self.confirmed = LSN(0)

    @property
    def in_flight(self) -> int:
        """How many issued batches are not done yet (marks not counted)."""
        return sum(1 for item in self._pending if type(item) is not _Mark) - len(self._done_early)

    def start_at(self, lsn: int) -> None:
        """Begin at *lsn*: what the server already has confirmed (or the start position)."""
        if lsn > self.handled:
            self.handled = LSN(lsn)
        if lsn > self.confirmed:
            self.confirmed = LSN(lsn)

    def issue(self, item: Issued) -> None:
        """Note that *item* is handed on; it must be reported :meth:`done` later."""
        self._pending.append(item)

    def done(self, item: Issued) -> None:
        """Note that *item* (issued before) is handled, by every handler and destination.

        In any order: the position moves over the contiguous prefix of done items.

        Raises:
            ValueError: *item* was not issued, or was reported done already.
        """
        pending = self._pending
        if pending and pending[0] is item:
            pending.popleft()
            end = item.end_lsn
            if self._done_early or (pending and type(pending[0]) is _Mark):
                end = self._pop_done(end)
            if end is not None:
                self._advance(end)
            return
        key = id(item)
        if self._stale.pop(key, None) is item:
            return  # from before a reset: the server sends it again
        if key in self._done_early or not any(p is item for p in pending):
            raise ValueError(f"{item!r} is not in flight: reported done twice, or never issued")
        self._done_early.add(key)

    def mark(self, lsn: int) -> None:
        """A position to confirm once everything issued before it is done."""
        if self._pending:
            self._pending.append(_Mark(lsn))
        else:
            self._advance(lsn)

    def reset(self) -> None:
        """Forget what is in flight: after a lost connection the server sends it again.

        Items issued before are *stale*: reporting one done later is
        allowed, and changes nothing (its copy sent again counts instead).
        """
        self._stale.update(
            (id(item), item)
            for item in self._pending
            if type(item) is not _Mark and id(item) not in self._done_early
        )
        self._pending.clear()
        self._done_early.clear()

    def _pop_done(self, end: int | None) -> int | None:
        """Pop the items at the head that are done already; the newest end among them."""
        pending = self._pending
        early = self._done_early
        while pending:
            head = pending[0]
            if type(head) is _Mark:
                pending.popleft()
            elif id(head) in early:
                early.discard(id(head))
                pending.popleft()
            else:
                break
            if head.end_lsn is not None:
                end = head.end_lsn
        return end

    def _advance(self, lsn: int) -> None:
        # Once per transaction: positions from the server are valid LSNs, so
        # no range check (int.__new__), and none at all when one is at hand.
        if lsn > self.handled:
            self.handled = lsn if type(lsn) is LSN else _new_lsn(LSN, lsn)
        cap = self.handled
        if self._holds:
            cap = LSN(min(cap, *self._holds.values()))
        if cap > self.confirmed:
            self.confirmed = cap
            if self._on_advance is not None:
                self._on_advance(cap)

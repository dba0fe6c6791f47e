"""walex.checkpoint: the at-least-once rule, without a server.

The confirmed position is the end of the newest transaction whose batches,
and those of every transaction before it, are done, whatever order they are
done in; never past a prepared transaction that is not committed yet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import examples
from walex.checkpoint import Checkpoint
from walex.lsn import LSN


@dataclass(eq=False)
class Item:
    """A batch as the checkpoint sees it: its transaction's end, on its last part."""

    end_lsn: int | None


def test_in_order_each_done_batch_moves_the_position() -> None:
    moves: list[LSN] = []
    cp = Checkpoint(on_advance=moves.append)
    a, b = Item(10), Item(20)
    cp.issue(a)
    cp.issue(b)
    assert cp.confirmed == 0
    cp.done(a)
    assert cp.confirmed == 10
    cp.done(b)
    assert cp.confirmed == 20
    assert moves == [10, 20]
    assert cp.in_flight == 0


def test_a_later_batch_done_first_waits_for_the_earlier_one() -> None:
    cp = Checkpoint()
    a, b, c = Item(10), Item(20), Item(30)
    for item in (a, b, c):
        cp.issue(item)
    cp.done(c)
    cp.done(b)
    assert cp.confirmed == 0  # a is still in flight: nothing after it is confirmed
    assert cp.in_flight == 1
    cp.done(a)
    assert cp.confirmed == 30


def test_a_transaction_in_parts_is_confirmed_after_its_last_part() -> None:
    cp = Checkpoint()
    first, last, next_txn = Item(None), Item(50), Item(60)
    for item in (first, last, next_txn):
        cp.issue(item)
    cp.done(last)
    cp.done(next_txn)
    assert cp.confirmed == 0
    cp.done(first)
    assert cp.confirmed == 60


def test_marks_wait_for_what_was_issued_before_them() -> None:
    cp = Checkpoint()
    cp.mark(5)  # nothing in flight: at once
    assert cp.confirmed == 5
    a = Item(10)
    cp.issue(a)
    cp.mark(15)  # an empty transaction after a
    assert cp.confirmed == 5
    cp.done(a)
    assert cp.confirmed == 15


def test_a_prepared_transaction_holds_the_position_below_it() -> None:
    holds: dict[object, int] = {}
    cp = Checkpoint(holds)
    a, b = Item(10), Item(40)
    cp.issue(a)
    cp.done(a)
    holds["gid"] = 25  # prepared at 25, not committed yet
    cp.issue(b)
    cp.done(b)
    assert cp.handled == 40
    assert cp.confirmed == 25
    del holds["gid"]  # committed (or rolled back) and handled
    cp.mark(41)
    assert cp.confirmed == 41


def test_the_position_never_goes_back() -> None:
    cp = Checkpoint()
    cp.start_at(100)
    cp.mark(50)
    assert cp.confirmed == 100
    a = Item(90)
    cp.issue(a)
    cp.done(a)
    assert cp.confirmed == 100


def test_done_twice_or_never_issued_is_a_bug_and_says_so() -> None:
    cp = Checkpoint()
    a, b = Item(10), Item(20)
    cp.issue(a)
    cp.issue(b)
    cp.done(b)
    with pytest.raises(ValueError, match="not in flight"):
        cp.done(b)
    with pytest.raises(ValueError, match="not in flight"):
        cp.done(Item(30))


def test_reset_forgets_what_was_in_flight() -> None:
    cp = Checkpoint()
    a = Item(10)
    cp.issue(a)
    cp.reset()
    assert cp.in_flight == 0
    cp.mark(20)
    assert cp.confirmed == 20


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=40),  # parts per transaction (0: a mark)
    st.randoms(use_true_random=False),
)
@settings(max_examples=examples(200), deadline=None)
def test_confirmed_is_always_the_end_of_the_done_prefix(
    parts: list[int], rnd: random.Random
) -> None:
    cp = Checkpoint()
    issued: list[Item] = []
    done: set[int] = set()
    lsn = 0
    for n in parts:
        lsn += 10
        if n == 0:
            cp.mark(lsn)
            issued.append(Item(lsn))
            done.add(len(issued) - 1)
            continue
        for i in range(n):
            item = Item(lsn if i == n - 1 else None)
            issued.append(item)
            cp.issue(item)
    todo = [i for i in range(len(issued)) if i not in done]
    rnd.shuffle(todo)
    for index in todo:
        cp.done(issued[index])
        done.add(index)
        # The contiguous done prefix, and the newest transaction end in it.
        expected = 0
        for i, item in enumerate(issued):
            if i not in done:
                break
            if item.end_lsn is not None:
                expected = item.end_lsn
        assert cp.confirmed == expected
    assert cp.confirmed == lsn
    assert cp.in_flight == 0


def test_a_batch_from_before_a_reset_may_still_be_reported_done() -> None:
    """Pipelined delivery: a batch in flight when the connection was lost is
    sent again by the server; the old copy's late report changes nothing."""
    cp = Checkpoint()
    old = Item(10)
    cp.issue(old)
    cp.reset()
    again = Item(10)
    cp.issue(again)
    cp.done(old)  # late, and harmless
    assert cp.confirmed == 0
    cp.done(again)
    assert cp.confirmed == 10
    with pytest.raises(ValueError, match="not in flight"):
        cp.done(old)  # but only once

"""The normalizer's outbox: everything in order normally; newest row per position while blocked."""

from __future__ import annotations

from normalize.conflate import Outbox
from normalize.events import PositionsSnapshot, SessionEnded
from normalize.model import GreeksSnapshot


def row(account: str, instrument: str, seq: int) -> GreeksSnapshot:
    return GreeksSnapshot(
        "ibkr", account, instrument, "SPY", "OPT", "C", 1.0, None, 100.0, 1.0, seq, seq, seq=seq
    )


def test_unblocked_keeps_every_row_in_order_and_take_empties() -> None:
    box = Outbox()
    box.add([row("U1", "A", 1), row("U1", "A", 2)])
    box.add([row("U1", "A", 3)])
    assert len(box) == 3
    batch = box.take()
    assert batch is not None
    assert [r.seq for r in batch.rows] == [1, 2, 3]
    assert box.take() is None
    assert box.empty
    assert box.conflated_total == 0


def test_blocked_keeps_the_newest_row_per_position_and_counts_the_rest() -> None:
    box = Outbox()
    box.add([row("U1", "A", 1), row("U1", "B", 1)])  # pending before the channel filled
    box.add([row("U1", "A", 2), row("U2", "A", 2)], blocked=True)
    box.add([row("U1", "A", 3), row("U1", "B", 3)], blocked=True)
    assert box.conflated_total == 3  # A/1, B/1, A/2 of U1 replaced
    batch = box.take()
    assert batch is not None
    assert sorted((r.account, r.instrument, r.seq) for r in batch.rows) == [
        ("U1", "A", 3),
        ("U1", "B", 3),
        ("U2", "A", 2),
    ]
    assert box.end_episode() == 3
    assert box.episode_conflated == 0
    box.add([row("U1", "A", 4), row("U1", "A", 5)])  # room again: nothing conflated
    taken = box.take()
    assert taken is not None
    assert [r.seq for r in taken.rows] == [4, 5]
    assert box.conflated_total == 3


def test_positions_and_sessions_are_never_conflated() -> None:
    box = Outbox()
    snaps = [PositionsSnapshot("ibkr", ("U1",), (), float(i)) for i in range(3)]
    ended = SessionEnded("ibkr", "s", 1.0, "stopped", 0)
    for s in snaps:
        box.add([row("U1", "A", 1)], [s], blocked=True)
    box.add([], sessions=[ended], blocked=True)
    batch = box.take()
    assert batch is not None
    assert batch.positions == tuple(snaps)
    assert batch.sessions == (ended,)
    assert len(batch.rows) == 1


def test_a_requeued_batch_goes_first_and_loses_only_to_newer_rows_while_conflating() -> None:
    box = Outbox()
    box.add([row("U1", "A", 1), row("U1", "B", 1)], [PositionsSnapshot("ibkr", ("U1",), (), 0.0)])
    taken = box.take()
    assert taken is not None
    box.add([row("U1", "C", 2)])
    box.requeue(taken)  # the send was cancelled
    again = box.take()
    assert again is not None
    assert [(r.instrument, r.seq) for r in again.rows] == [("A", 1), ("B", 1), ("C", 2)]
    assert len(again.positions) == 1

    box.add([row("U1", "A", 3)], blocked=True)
    box.requeue(again)  # while conflating: A/3 is newer than the requeued A/1
    last = box.take()
    assert last is not None
    assert sorted((r.instrument, r.seq) for r in last.rows) == [("A", 3), ("B", 1), ("C", 2)]
    assert box.conflated_total == 1


def test_blocked_keeps_every_row_up_to_keep_rows_then_conflates() -> None:
    # A short backlog (a slow commit, a burst) loses nothing: up to keep_rows pending rows stay,
    # in order, while the channel is full; only past that does the newest row per position win.
    box = Outbox(keep_rows=4)
    box.add([row("U1", "A", 1), row("U1", "A", 2)], blocked=True)
    box.add([row("U1", "A", 3), row("U1", "A", 4)], blocked=True)
    assert box.conflated_total == 0
    assert len(box) == 4
    batch = box.take()
    assert batch is not None
    assert [r.seq for r in batch.rows] == [1, 2, 3, 4]

    box.add([row("U1", "A", 5), row("U1", "B", 5), row("U1", "A", 6)], blocked=True)
    box.add([row("U1", "A", 7), row("U1", "B", 7)], blocked=True)  # 5 pending: past keep_rows
    assert box.conflated_total == 3  # A/5, A/6, B/5 replaced
    batch = box.take()
    assert batch is not None
    assert [(r.instrument, r.seq) for r in batch.rows] == [("A", 7), ("B", 7)]
    assert box.end_episode() == 3


def test_take_hands_out_at_most_max_rows_in_order_positions_with_the_first() -> None:
    # The rows channel counts items, not rows: capping an item's rows bounds what it can hold.
    box = Outbox(keep_rows=100)
    snap = PositionsSnapshot("ibkr", ("U1",), (), 1.0)
    ended = SessionEnded("ibkr", "s", 1.0, "stopped", 0)
    box.add([row("U1", "A", i) for i in range(1, 8)], [snap], [ended])
    first = box.take(3)
    assert first is not None
    assert [r.seq for r in first.rows] == [1, 2, 3]
    assert (first.positions, first.sessions) == ((snap,), (ended,))
    box.add([row("U1", "A", 8)])
    second, third = box.take(3), box.take(3)
    assert second is not None
    assert third is not None
    assert [r.seq for r in second.rows] == [4, 5, 6]
    assert [r.seq for r in third.rows] == [7, 8]
    assert (second.positions, second.sessions, third.positions) == ((), (), ())
    assert box.take(3) is None
    # while conflating too: what is left after the cap stays pending, nothing more is dropped
    box = Outbox(keep_rows=0)
    box.add([row("U1", k, 1) for k in "ABCDE"])
    box.add([row("U1", k, 2) for k in "ABCDE"], blocked=True)
    assert box.conflated_total == 5
    capped, rest = box.take(2), box.take()
    assert capped is not None
    assert rest is not None
    assert len(capped.rows) == 2
    assert sorted((r.instrument, r.seq) for r in [*capped.rows, *rest.rows]) == [(k, 2) for k in "ABCDE"]
    assert box.conflated_total == 5
    assert box.take() is None

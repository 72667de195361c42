"""PendingLatest: the newest row of each position over deferred batches, as the upsert decides."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from db.batch import Batch
from db.encode import MATRIX_ROWS, Dimensions, PendingLatest, Prepared, pending_positions, row_position_key
from normalize.model import GreeksSnapshot

from .rows import row


def snapshot(seq: int, *, ts: float, n_instruments: int) -> GreeksSnapshot:
    """Instrument ``seq % n_instruments`` (strike 500 + that), event time ``ts``."""
    return row(0, ts=ts, instrument=f"SPY   250117C{500 + seq % n_instruments:05d}000")._replace(seq=seq)


def _prepared(rows: list[GreeksSnapshot], dims: Dimensions) -> Prepared:
    dims.add({row_position_key(r): int(r.instrument[-8:-3]) for r in rows})  # id = strike
    return Prepared(Batch(uuid.uuid4(), rows), dims, 2000, defer_latest=True).run(dims)


def test_a_deferred_batch_goes_by_copy_upserts_nothing_and_keeps_its_newest_rows() -> None:
    dims = Dimensions()
    rows = [snapshot(i, ts=100.0 + i, n_instruments=3) for i in range(7)]
    for copy_min_rows in (2000, 1):  # deferred: by COPY whatever its size
        p = Prepared(Batch(uuid.uuid4(), rows), dims, copy_min_rows, defer_latest=True)
        dims.add({row_position_key(r): int(r.instrument[-8:-3]) for r in rows})
        p.run(dims, eager=True)
        assert p.large
        assert p.rows_args is None
        assert p.latest_args == ([], [])  # no latest row
        assert p.payload is not None
        assert sorted(p.newest) == [4, 5, 6]  # the last row of each of the 3 instruments
    small = Prepared(Batch(uuid.uuid4(), rows), dims, 2000).run(dims)
    assert not small.large
    assert small.rows_args is not None
    assert sorted(i for i, flag in enumerate(small.rows_args[0][-1]) if flag is not None) == [4, 5, 6]
    immediate = Prepared(Batch(uuid.uuid4(), rows), dims, 1).run(dims)
    assert immediate.latest_args is not None
    assert len(immediate.latest_args[1]) == 3


def test_newer_wins_across_batches_and_a_tie_goes_to_the_later_batch() -> None:
    dims = Dimensions()
    pending = PendingLatest()
    assert not pending
    assert pending.wait_s(0.0, 0.1) is None
    assert not pending.due(10.0, 0.1)
    first = _prepared([snapshot(0, ts=200.0, n_instruments=2), snapshot(1, ts=200.0, n_instruments=2)], dims)
    pending.add(first, now=50.0)
    # instrument 0: a stale row (older event time) must not replace the pending one;
    # instrument 1: the same times again (a tie): the later batch's row wins.
    second = _prepared([snapshot(2, ts=150.0, n_instruments=2), snapshot(3, ts=200.0, n_instruments=2)], dims)
    pending.add(second, now=50.05)

    assert len(pending) == 2
    assert pending.wait_s(50.06, 0.1) == pytest.approx(0.04)
    assert not pending.due(50.06, 0.1)
    assert pending.due(50.1, 0.1)
    matrix, seqs, batch_ids = pending.params()
    assert batch_ids == [first.batch.batch_id, second.batch.batch_id]
    assert len(matrix) == len(MATRIX_ROWS)
    by_position = dict(zip(matrix[0], zip(seqs, matrix[-1], strict=True), strict=True))
    # position id = strike: instrument 0 is strike 500, instrument 1 strike 501
    assert by_position == {500.0: (0, 1.0), 501.0: (3, 2.0)}  # (seq, 1-based batch index)
    assert matrix[1] == [200.0, 200.0]  # event times

    pending.clear()
    assert not pending
    assert pending.params() == ([], [], [])


def test_a_newer_row_in_a_later_batch_replaces_the_pending_one() -> None:
    dims = Dimensions()
    pending = PendingLatest()
    pending.add(_prepared([snapshot(0, ts=1.0, n_instruments=1)], dims), now=0.0)
    pending.add(_prepared([snapshot(1, ts=2.0, n_instruments=1)], dims), now=0.0)
    pending.add(_prepared([snapshot(2, ts=1.5, n_instruments=1)], dims), now=0.0)
    _, seqs, batch_ids = pending.params()
    assert seqs == [1]
    assert len(batch_ids) == 3


@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 5), st.sampled_from([1.0, 2.0, 3.0]), st.sampled_from([0.0, 0.5])),
            min_size=0,
            max_size=8,
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_flush_carries_each_positions_newest_row_over_all_batches(
    batches: list[list[tuple[int, float, float]]],
) -> None:
    # Each position's row in the flush is the one the upsert would keep applying the batches in
    # order: the greatest (event_ts, received_ts), the later batch and the later row on a tie;
    # every field the statement reads comes from that row, whatever batch it is in.
    dims = Dimensions()
    pending = PendingLatest()
    expected: dict[float, tuple[tuple[float, float], int, float, float]] = {}
    seq = 0
    for b, spec in enumerate(batches, 1):
        rows = []
        for instrument, ts, later in spec:
            r = snapshot(instrument, ts=ts, n_instruments=6)._replace(
                received_ts=ts + later, seq=seq, bid=float(seq), greeks_source=("broker", "model")[seq % 2]
            )
            rows.append(r)
            pid = float(500 + instrument)
            if pid not in expected or (ts, ts + later) >= expected[pid][0]:
                expected[pid] = ((ts, ts + later), seq, float(b), float(seq))
            seq += 1
        pending.add(_prepared(rows, dims), now=0.0)
    matrix, seqs, batch_ids = pending.params()
    assert len(batch_ids) == len(batches)
    if not expected:
        assert (matrix, seqs) == ([], [])
        return
    bid = MATRIX_ROWS.index("bid")
    source = MATRIX_ROWS.index("greeks_source")
    got = {
        pid: ((matrix[1][i], matrix[2][i]), seqs[i], matrix[-1][i], matrix[bid][i])
        for i, pid in enumerate(matrix[0])
    }
    assert len(got) == len(matrix[0])  # one row per position
    assert got == expected
    assert all(matrix[source][i] == (1.0, 2.0)[seqs[i] % 2] for i in range(len(seqs)))


def test_a_failed_flushs_rows_go_back_ahead_of_the_newer_ones() -> None:
    # The flush beside the writes takes what is pending; when it fails its batches go back
    # ahead of those added meanwhile, so that a newer row still wins and a tie still goes to the
    # later batch; the oldest commit time stays the one the interval counts from.
    dims = Dimensions()
    taken = PendingLatest()
    first = _prepared([snapshot(0, ts=2.0, n_instruments=2), snapshot(1, ts=5.0, n_instruments=2)], dims)
    taken.add(first, now=10.0)
    pending = PendingLatest()
    pending.requeue(PendingLatest())  # nothing to put back
    assert not pending
    second = _prepared([snapshot(2, ts=3.0, n_instruments=2), snapshot(3, ts=5.0, n_instruments=2)], dims)
    pending.add(second, now=11.0)
    assert pending_positions(taken, pending) == 2
    pending.requeue(taken)
    assert pending.since == 10.0
    matrix, seqs, batch_ids = pending.params()
    assert batch_ids == [first.batch.batch_id, second.batch.batch_id]
    assert dict(zip(matrix[0], seqs, strict=True)) == {500.0: 2, 501.0: 3}  # newer; a tie: later
    assert len(pending) == 2

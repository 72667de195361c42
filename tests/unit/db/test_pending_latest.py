"""PendingLatest: the newest row of each position over deferred batches, as the upsert decides."""

from __future__ import annotations

import uuid

import pytest

from db.batch import Batch
from db.encode import MATRIX_ROWS, Dimensions, PendingLatest, Prepared, row_position_key
from normalize.model import GreeksSnapshot

from .rows import row


def snapshot(seq: int, *, ts: float, n_instruments: int) -> GreeksSnapshot:
    """Instrument ``seq % n_instruments`` (strike 500 + that), event time ``ts``."""
    return row(0, ts=ts, instrument=f"SPY   250117C{500 + seq % n_instruments:05d}000")._replace(seq=seq)


def _prepared(rows: list[GreeksSnapshot], dims: Dimensions) -> Prepared:
    dims.add({row_position_key(r): int(r.instrument[-8:-3]) for r in rows})  # id = strike
    return Prepared(Batch(uuid.uuid4(), rows), dims, 2000, defer_latest=True).run(dims)


def test_a_deferred_batch_upserts_nothing_and_keeps_its_newest_rows() -> None:
    dims = Dimensions()
    rows = [snapshot(i, ts=100.0 + i, n_instruments=3) for i in range(7)]
    p = _prepared(rows, dims)
    assert p.rows_args is not None
    assert p.rows_args[0][-1] == [None] * 7  # the statement's newest flags: no latest row
    assert sorted(p.newest) == [4, 5, 6]  # the last row of each of the 3 instruments
    large = Prepared(Batch(uuid.uuid4(), rows), dims, 1, defer_latest=True).run(dims)
    assert large.latest_args == ([], [])
    assert sorted(large.newest) == [4, 5, 6]
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
